"""Training pipelines: the tiny-code target pretraining (corpus, tokenizer, pretrain)."""
