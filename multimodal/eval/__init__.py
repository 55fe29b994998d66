"""Evaluation: retrieval metrics (pure tensors) and embedding of shards."""
