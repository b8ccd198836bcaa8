"""The base model: a plain PyTorch Llama-family transformer with LoRA hooks (gpt-fast style)."""
