"""`geex-serve`: HTTP serving (OpenAI-compatible and CodeGeeX API) over the continuous-batching
engine (`geex_jax.inference.engine`)."""
