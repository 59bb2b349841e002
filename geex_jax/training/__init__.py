"""Training a model: the loss and the jitted step (`step`), the train state and its shardings
(`state`), train-state checkpoints with the input pipeline's state (`checkpointing`), the
periodic actions of the loop (`hooks`: checkpoint, metrics, held-out evaluation, profiler), the
operative gin config of a run (`run_config`), the optimizer (`optim`), the gin-configured loop
(`train`) and `geex-train` (`cli`). Builds on geex_jax.model, geex_jax.data and the leaves."""
