"""Data: streaming document sources, the embedded standard-library corpus, tokenized shards."""
