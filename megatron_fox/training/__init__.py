"""Training support for megatron_fox: tokenizer, data pipeline, trainer glue."""
