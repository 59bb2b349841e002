"""The training data: the corpus builder (`corpus`, `filters`, `records`; `geex-data`: `cli`),
the language mixture (`mixture`, `catalog`), the seqio Tasks and vocabulary (`tasks`,
`vocabulary`), and the batch pipeline the trainer reads (`pipeline`: documents -> packed rows
with an O(1) resumable state; `batches`: the gin-configurable data sources and row packing).
Builds on the shared leaves (languages, tokenizer, fileio, errors)."""
