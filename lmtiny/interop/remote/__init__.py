"""Source shipped inside exports, never imported by lmtiny: modeling_lmtiny.py (LmtinyConfig and
LmtinyForCausalLM) is copied next to config.json, whose `auto_map` names it, so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` runs every lmtiny architecture in
PyTorch. It imports torch and transformers; lmtiny reads it as text (lmtiny.interop.architectures)."""
