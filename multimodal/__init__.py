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

# Notices a user of this project cannot act on, printed at every start: Lightning's advertisement for
# its cloud logger, and open_clip's warning that a model it built has no pretrained weights (this
# project builds models empty on purpose and loads their weights itself).
import logging  # noqa: E402

from multimodal.errors import Unactionable  # noqa: E402

logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(Unactionable("litlogger"))
logging.getLogger().addFilter(Unactionable("No pretrained weights loaded for model"))
