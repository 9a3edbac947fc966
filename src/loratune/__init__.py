"""loratune: fine-tune small causal language models with QLoRA and LoRA."""

__version__ = "0.1.0"
