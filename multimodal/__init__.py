"""multimodal: CLIP-style contrastive training on streamed image-text shards.

The library layers, bottom to top (imports only flow upwards):
  loss, distributed, optim      torch only
  arch, model                   open_clip towers, a pure nn.Module
  data/, eval/                  shard I/O, streaming pipeline, metrics (no Lightning)
  module, data.datamodule       the Lightning adapters
  cli, demo                     the `multimodal` command
"""

__version__ = "0.1.0"

import os

# Nothing is fetched from a hub at run time: weights and tokenizers come from local files only.
# huggingface_hub reads this once when imported (open_clip imports it), so it is set here first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
