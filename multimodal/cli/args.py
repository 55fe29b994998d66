"""Options shared by several commands, and the checks they need before any heavy import.

Nothing here imports torch, Lightning or open_clip: `multimodal CMD --help` and mistakes found in
the arguments alone answer in a fraction of a second.
"""

import argparse
from pathlib import Path

from multimodal.errors import UserError


def add_checkpoint_args(parser: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    parser.add_argument("--checkpoint", type=Path, required=required,
                        help=help or "this project's Lightning .ckpt, or an open_clip state dict "
                                     "(.pt/.bin/.safetensors)")
    parser.add_argument("--model", default=None,
                        help="architecture of an open_clip state dict (ViT-B-32, tiny, a JSON path); "
                             "overrides the one a .ckpt names")


def add_decode_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu"),
                        help="where JPEGs are decoded: gpu (the batch together, where the model runs: nvJPEG on "
                             "CUDA), cpu (the loader workers), auto: gpu on a GPU")


def check_counts(args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
                 ) -> None:
    """The named integer options of `args` are at least 1 (`positive`) or at least 0 (`non_negative`)."""
    for names, least in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(args, name)
            if value < least:
                raise UserError(f"--{name} must be {'a positive integer' if least else '0 or more'}, got {value}.")
