"""Hugging Face interop: lmtiny runs <-> checkpoints (`convert`), which architecture carries a
model (`architectures`: Llama / Qwen3 in `llama`, NanoChat and lmtiny's shipped modeling file in
`nanochat`, the file itself in `remote/`), tensor layouts (`tensors`) and the safetensors format
(`safetensors_io`)."""
