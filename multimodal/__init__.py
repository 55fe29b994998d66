"""multimodal: CLIP-style contrastive training on streamed image-text shards.

The library layers, bottom to top (imports only flow upwards):
  loss, distributed, optim      torch only (and decoding: text generation over a decoder's logits)
  arch, model, fsdp             open_clip towers, a pure nn.Module, and FSDP's shapes applied from outside
  data/, eval/                  shard I/O, streaming pipeline, metrics (no Lightning)
  module, data.datamodule       the Lightning adapters; recipe builds what the module trains
  cli, demo                     the `multimodal` command
"""

__version__ = "0.1.0"

import os

# Nothing is fetched from a hub at run time: weights and tokenizers come from local files only.
# huggingface_hub reads this once when imported (open_clip imports it), so it is set here first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Notices a user of this project cannot act on (Lightning's logger tip, open_clip's "no pretrained weights").
from multimodal import notices  # noqa: E402

notices.install()
