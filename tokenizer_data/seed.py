"""The seed's mixture: 45% Wikipedia, 40% books, 15% conversation (needs the network once).

  python -m lmtiny.tokenizer.train --mixture tokenizer_data/seed.py --vocab-size 32768 \
      --out tokenizers/seed32k

- Wikipedia: TFDS `wiki40b/en` (cleaned article text), read with `tfds.data_source`. The first
  use downloads and prepares it in array_record format; wiki40b's generator needs apache-beam
  (`pip install apache-beam`), or build it once with
  `tfds build wiki40b/en --file_format=array_record`.
- Books: Project Gutenberg's English books as parquet on the Hugging Face hub
  (sedthh/gutenberg_english, column TEXT); `sample` spreads the share over many books.
- Conversation: reddit comments (HuggingFaceGECLM/REDDIT_comments, pushshift dumps, one parquet
  shard group per subreddit, column `body`).
The hub sources need `pip install huggingface_hub`; shards are fetched one at a time, only as
many as the character budget needs.
"""
RECIPE = dict(
    sources=[
        dict(spec="tfds:wiki40b/en?split=train&field=text", weight=45),
        dict(spec="hf:sedthh/gutenberg_english?pattern=data/train-*.parquet&column=TEXT",
             weight=40, sample=0.25),
        dict(spec="hf:HuggingFaceGECLM/REDDIT_comments?pattern=data/*.parquet&column=body",
             weight=15, sample=0.2),
    ],
    total_chars=300_000_000,
    seed=0,
)
