"""A mixture over your own files, in the seed's proportions (45 / 40 / 15).

  python -m lmtiny.tokenizer.train --mixture tokenizer_data/local_files.py --vocab-size 32768 \
      --out tokenizers/local32k

Put (or link) your text under data/ and edit the globs; any spec of lmtiny.data.sources works:
txt / txt.gz (one document per file, or `?delimiter=record` for files whose documents are
separated by "\n\n\x1e\n\n"), jsonl(.gz) with `?field=`, parquet with `?column=`.
Relative paths are relative to the directory you run the command from.
"""
RECIPE = dict(
    sources=[
        dict(spec="txt:data/wiki/**/*.txt*?delimiter=record", weight=45),
        dict(spec="txt:data/books/**/*.txt*", weight=40),
        dict(spec="jsonl:data/chat/**/*.jsonl*?field=messages", weight=15),
    ],
    total_chars=100_000_000,
    seed=0,
)
