"""lmtiny: design, train and sample tiny language models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="lmtiny",
    version="0.1.0",
    description="Tiny language models (25M-2B params) in JAX/Flax on TPU, GPU and CPU.",
    python_requires=">=3.11",
    packages=find_packages(include=["lmtiny", "lmtiny.*"]),
    install_requires=[
        # Tested up to the newest jax that installs on Python 3.12 (.ci/run runs the kernel,
        # attention and lowering tests there too); raise the bound once a newer one passes them.
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "sentencepiece>=0.2.0",
        "tensorflow-datasets>=4.9.10",
        "numpy>=2.0",
        "ml-collections>=1.1.0",
        "absl-py>=2.1",
        "pyarrow>=15",        # parquet sources (FineWeb-Edu shards)
        "huggingface_hub>=0.24",  # hf: sources (eval tasks, RL and SFT data, FineWeb-Edu); ~5 MB with hf-xet
        "matplotlib>=3.8",    # loss-curve and LR-finder plots
        "tqdm>=4.66",         # progress bars
    ],
    extras_require={
        # Light on purpose (no torch, no libtpu): a CPU box installs it in about a minute. The
        # PyTorch / Hugging Face reference tests need "hf" and the XLA:TPU compile tests "tpu";
        # they skip without them (.ci/run installs both, with PyTorch's CPU build).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "tiktoken>=0.7",
                 "tensorboard>=2.16",  # reads lmtiny.runs.tensorboard's event files back
                 "ruff>=0.6"],  # the lint (.ci/ruff.toml; tests/test_lint.py)
        # The chat page in headless Chromium (tests/chat/test_chat_server.py; apt: chromium
        # chromium-driver). Not in "test": without a browser the test skips anyway, and selenium
        # with its trio stack added 4.4 s to the README's test command's install.
        "browser": ["selenium>=4.20"],
        "hf": ["torch>=2.4", "transformers>=5.0", "safetensors>=0.4", "tokenizers>=0.21"],  # HF tokenizers on import; transformers/torch to run exports
        "compare": ["tiktoken>=0.7"],
        "bench": ["torch>=2.4"],  # benchmarks/torch_reference.py
        "tpu": ["jax[tpu]>=0.10.2,<0.13", "gcsfs", "google-cloud-storage"],  # gs:// workdirs
        "cuda": ["jax[cuda12]>=0.10.2,<0.13"],
        # Real clients of lmtiny.serve: tests/chat/test_openai_client.py, test_lm_eval_client.py.
        "serve": ["openai>=1.40", "lm_eval[api]>=0.4.13"],
        # Weights & Biases beside TensorBoard (train.trackers=tensorboard,wandb; lmtiny.runs.tracking);
        # tests/runs/test_tracking.py reads its offline runs back.
        "track": ["wandb>=0.17"],
    },
)
