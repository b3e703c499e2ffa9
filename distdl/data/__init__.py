"""Data pipelines: text (tokenizer, MLM blocks) and, later, vision."""
