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


def positive(option: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"--{option} must be a positive integer, got {value}.")
