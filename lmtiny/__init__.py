"""lmtiny: design, train and sample tiny language models in JAX/Flax."""

__version__ = "0.1.0"
