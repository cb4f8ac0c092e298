"""Chat: conversation data (sources, the embedded question set, packing), supervised fine-tuning
and midtraining on the one trainer, LoRA adapters, and the web chat server."""
