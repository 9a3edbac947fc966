"""Models: loading bases and tokenizers, LoRA adapters, merging and export."""
