"""Data: shard writing (`shards`), synthetic scenes (`synthetic`), the streaming pipeline
(`pipeline`) and the Lightning DataModule (`datamodule`, the only Lightning user here)."""
