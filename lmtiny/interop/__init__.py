"""Hugging Face interop: Llama/Qwen3 checkpoints <-> lmtiny runs (`convert`), the weight layout
(`llama`) and the safetensors format (`safetensors_io`)."""
