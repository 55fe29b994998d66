"""`multimodal export`, `multimodal embed` and `multimodal eval {retrieval,zeroshot}`."""

import argparse
from pathlib import Path

from multimodal import weights


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="this project's Lightning .ckpt, or an open_clip state dict (.pt/.bin/.safetensors)")
    parser.add_argument("--model", default=None,
                        help="architecture of an open_clip state dict (ViT-B-32, tiny, a JSON path); "
                             "overrides the one a .ckpt names")


def export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="multimodal export",
                                     description="Write trained towers as an open_clip state dict.")
    add_checkpoint_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="output file: .safetensors (default) or .pt")
    args = parser.parse_args(argv)
    model, name = weights.load_model(args.checkpoint, args.model)
    written = weights.export(model, name, args.out)
    for path in written:
        print(f"Wrote {path}")
    if len(written) > 1:
        print(f"Load it with: open_clip.add_model_config('{written[1]}'); "
              f"open_clip.create_model_and_transforms('{written[1].stem}', pretrained='{args.out}')")
    else:
        print(f"Load it with: open_clip.create_model_and_transforms('{name}', pretrained='{args.out}')")
    return 0
