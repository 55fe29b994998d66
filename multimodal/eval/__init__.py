"""Evaluation: retrieval metrics (pure tensors), caption metrics (pure Python) and embedding of shards."""
