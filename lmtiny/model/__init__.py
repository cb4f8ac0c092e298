"""The model: the transformer and its attention, LoRA adapters, weight quantization, and sampling."""
