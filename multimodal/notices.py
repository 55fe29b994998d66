"""Notices a user of this project cannot act on, kept out of the output of every command.

Lightning's advertisement for its cloud logger and open_clip's warning that a model it built has no
pretrained weights (this project builds models empty on purpose and loads weights itself) are log
records, dropped by `Unactionable` filters that importing `multimodal` installs. `QUIET` are the
warnings of a training run about what this project does on purpose; `multimodal train` ignores them.
"""

import logging

# Lightning's warnings about our deliberate choices: args passed from Python, two loggers sharing
# one folder, __len__ on the IterableDataset (exact per rank by construction), no validation
# shards (an empty val loader), a deprecation inside Lightning itself; and mid-epoch resume, which the
# stream does position (ImageTextStream's `resume`), though not through Lightning's loader state.
QUIET = (
    ".*args parameter is intended to run from within Python.*",
    ".*Experiment logs directory .* exists and is not empty.*",
    ".*Your `IterableDataset` has `__len__` defined.*",
    ".*Total length of `list` across ranks is zero.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable.*",
)


class Unactionable(logging.Filter):
    """Drops log records holding one of `texts`."""

    def __init__(self, *texts: str):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def install() -> None:
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(Unactionable("litlogger"))
    logging.getLogger().addFilter(Unactionable("No pretrained weights loaded for model"))
