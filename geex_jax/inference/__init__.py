"""Generating code with a trained model: the jitted decode loop over a KV cache (`decoding`),
the choice of each next token (`token_choice`: greedy, temperature, top-k/top-p, seeds), beam
search (`beam_search`), the languages' stop rules compiled into device tables (`stop_automata`),
int8 weights (`quantization`) and their decode-time matmul (`decode_matmul`), the `Sampler` that
ties them to a checkpoint and a tokenizer (`sampler`), and `geex-sample` (`cli`). Builds on
geex_jax.model and the shared leaves."""
