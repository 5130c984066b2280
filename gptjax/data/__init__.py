"""Text in, batches out: the built-in corpus and other sources, tokenizers, token files,
and the (seed, step) -> batch functions the training loop reads."""
