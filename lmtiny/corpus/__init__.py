"""Raw text: document sources (files, parquet, TFDS, hub) and the embedded standard-library corpus."""
