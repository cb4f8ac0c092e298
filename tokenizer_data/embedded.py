"""The embedded standard-library corpus alone: works offline on any Python installation.

  python -m lmtiny.tokenizer.train --mixture tokenizer_data/embedded.py --vocab-size 8192 \
      --out tokenizers/embedded8k

About 10 MB of text (English reference prose, docstrings, Python code): enough for a demo
tokenizer of a few thousand pieces, too little and too code-heavy for 32K.
"""
RECIPE = dict(
    sources=[dict(spec="embedded", weight=1)],
    total_chars=10_000_000,  # about all of it (CPython 3.11: 10.6 M characters)
    seed=0,
)
