"""GPT-2 compiled ahead of time by IREE: generate with a KV cache and fine-tune on device."""
