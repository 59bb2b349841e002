"""The CodeGeeX network and its parameters: the Flax decoder with its top query layer
(`codegeex`), how the parameters lie on a device mesh (`partitioning`: logical axes -> mesh
axes), and params checkpoints on disk (`checkpoints`: config.json + an Orbax params tree, read and
written tensor by tensor through `streaming`). Every other stage builds on this package; it
imports only the shared leaves (errors, fileio)."""
