"""`multimodal shards {coco,csv,karpathy}`: write webdataset shards of image-text pairs (the arguments
are checked before the shard writer and its image libraries are imported)."""

import argparse
import sys
from pathlib import Path

from multimodal.errors import UserError
from multimodal.paths import check_input, check_output
from multimodal.userfiles import CAPTION_CHARS, check_file, limit

SOURCE_FILES = {  # source -> (option, what it names, what to pass)
    "coco": ("captions", "Captions file", "pass a COCO captions JSON with --captions"),
    "csv": ("csv", "CSV file", "pass an image,caption table with --csv"),
    "karpathy": ("json", "Karpathy split file",
                 "pass dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json with --json"),
}


def shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal shards",
                                     description="Write webdataset shards of image-text pairs.")
    sub = parser.add_subparsers(dest="source", required=True)
    coco = sub.add_parser("coco", help="from an official COCO captions JSON")
    coco.add_argument("--captions", type=Path, required=True, help="e.g. annotations/captions_train2017.json")
    csv = sub.add_parser("csv", help="from an image,caption CSV table (several rows per image allowed)")
    csv.add_argument("--csv", type=Path, required=True, help="CSV with a header holding 'image' and 'caption'")
    karpathy = sub.add_parser("karpathy", help="a split of a Karpathy split file: the COCO 5k and Flickr30k 1k "
                                               "retrieval test sets, each image with all its captions")
    karpathy.add_argument("--json", type=Path, required=True,
                          help="dataset_coco.json, dataset_flickr30k.json or dataset_flickr8k.json")
    karpathy.add_argument("--split", nargs="+", default=["test"],
                          help="the splits to write, space-separated: --split test, or --split test val "
                               "(train, val, test; COCO also restval). Default: test")
    for p in (coco, csv, karpathy):
        p.add_argument("--images", type=Path, required=True,
                       help="folder holding the image files" + (
                           " (for COCO the folder holding val2014/ and train2014/, or val2014/ itself)"
                           if p is karpathy else ""))
        p.add_argument("--out", type=Path, required=True, help="output folder for shard-NNNNNN.tar and sizes.json")
        p.add_argument("--shard_size", type=int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--max_side", type=int, default=None, help="downscale images whose longer side exceeds this")
        p.add_argument("--num_workers", type=int, default=4, help="threads reading and resizing images (default 4)")
        p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    return parser


def write_shards(argv: list[str]) -> int:
    args = shards_parser().parse_args(argv)
    option, what, hint = SOURCE_FILES[args.source]
    source = getattr(args, option)
    check_input(source, what, hint)
    check_file(source)
    check_input(args.images, "Image folder", "pass the folder that holds the images with --images", "folder")
    check_output(args.out, "--out", "folder")
    from multimodal.data import shards

    common = dict(shard_size=args.shard_size, max_side=args.max_side, workers=args.num_workers,
                  overwrite=args.overwrite, option="--out", setting="--{}")
    if args.source == "coco":
        report = shards.write_coco(source, args.images, args.out, **common)
    elif args.source == "csv":
        report = shards.write_csv(source, args.images, args.out, **common)
    else:
        report = shards.write_karpathy(source, args.images, args.out, tuple(args.split), **common)
    for name, reason in report.failures:
        print(f"could not read {name}: {reason}", file=sys.stderr)
    print(f"Wrote {report.num_samples} samples in {len(report.sizes)} shards to {args.out}"
          + "".join(f"; {split}: {images} images, {captions} captions"
                    for split, (images, captions) in report.splits.items())
          + _failures(report, args.images) + _cut(report.cut))
    if report.num_samples == 0:
        raise UserError(f"No image could be read from {args.images}: check --images against the file names.")
    return 0


def _failures(report, images: Path) -> str:
    if not report.failures:
        return "."
    return (f"; {len(report.failures)} images could not be read (listed above)"
            + (f", {report.missing} of them missing from {images}." if report.missing else "."))


def _cut(cut: int) -> str:
    if not cut:
        return ""
    most, many = limit(CAPTION_CHARS), cut > 1
    return (f" {cut} caption{'s' * many} longer than {most} characters {'were' if many else 'was'} cut to "
            f"{'their' if many else 'its'} first {most} (set {CAPTION_CHARS} to keep more).")
