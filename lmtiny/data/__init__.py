"""Tokenized data: writing array_record shards, weighted mixtures, loading and the grain pipeline."""
