"""`multimodal search`, `multimodal index`, `multimodal plot` and `multimodal models`: what a model finds (and
the index that finds it among millions), how a run went, which architectures and published weights there are.

Arguments are parsed and checked before torch, open_clip or matplotlib is imported.
"""

import argparse
import re
from pathlib import Path

from multimodal.cli.args import add_checkpoint_args, check_counts, check_weights, load_model, weights_given
from multimodal.errors import UserError
from multimodal.files import save_image
from multimodal.paths import check_input, check_output
from multimodal.plot import plot_run
from multimodal.userfiles import read_bytes, reading, writing

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal search", description="Search an embedding folder or an index.")
    parser.add_argument("--index", type=Path, required=True,
                        help="an embedding folder from `multimodal embed` (every row scored exactly) or an index "
                             "folder from `multimodal index` (approximate, the candidates re-scored exactly)")
    parser.add_argument("--text", help="a text query")
    parser.add_argument("--image", type=Path, help="an image query")
    parser.add_argument("--target", choices=("images", "texts"), default=None,
                        help="search the folder's images (default when it has them) or its texts")
    parser.add_argument("--k", type=int, default=8, help="matches to show (default 8)")
    parser.add_argument("--grid", type=Path, default=None, help="write a contact sheet of the top images here")
    add_checkpoint_args(parser, required=False, help="model for the query (default: the one that made the index)")
    return parser


def search(argv: list[str]) -> int:
    args = search_parser().parse_args(argv)
    if bool(args.text) == bool(args.image):
        raise UserError("Pass exactly one query: --text or --image.")
    check_counts(args, positive=("k",))
    if args.grid is not None:
        check_output(args.grid, "--grid", "file", GRID_SUFFIXES)
    check_input(args.index, "Embedding folder", "pass a folder written by `multimodal embed` or `multimodal index` "
                "with --index", "folder")
    if args.image is not None:
        check_input(args.image, "Query image", "pass an image file with --image")
    check_weights(args)
    import torch

    from multimodal import weights
    from multimodal.data.pixels import EvalTransform
    from multimodal.eval.search import Collection, check_query_model, contact_sheet, images_of

    query_image = _query_image(args.image) if args.image is not None else None
    found = Collection(args.index, args.target, setting="--{}")
    info = found.info
    check_query_model(info, args.index, args.checkpoint, args.model, args.pretrained)
    model = load_model(args) if weights_given(args) else \
        weights.load_model(info["checkpoint"], args.model or info["model"], pretrained=info.get("pretrained"),
                           cache_dir=args.cache_dir, setting="--{}")
    model.eval()
    with torch.no_grad():
        if args.text:
            query = model.encode_text(model.architecture.tokenizer([args.text]))[0]
        else:
            query = model.encode_image(EvalTransform.of(model.architecture.preprocessing)(query_image)[None])[0]
    hits = found.search(query, args.k)
    print(f"{'rank':>4} {'score':>7}  match")
    for rank, hit in enumerate(hits, start=1):
        what = hit.meta.get("file_name") or hit.meta.get("caption", "")
        print(f"{rank:>4} {hit.score:7.4f}  {hit.meta.get('key', hit.row)}  {what}")
    if args.grid:
        if found.target != "images":
            raise UserError("--grid draws images: search --target images.")
        images = images_of([hit.meta for hit in hits])
        title = f'"{args.text}"' if args.text else f"like {args.image.name}"
        sheet = contact_sheet([(title, [(im, f"{hit.score:.3f}") for im, hit in zip(images, hits)])])
        with writing(args.grid):
            save_image(sheet, args.grid)
        print(f"Wrote {args.grid}")
    return 0


def index_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal index", description="Build an approximate nearest-neighbour "
                                     "index (faiss) of an embedding folder, or merge indexes of its parts.")
    parser.add_argument("embeddings", type=Path, nargs="?", default=None,
                        help="an embedding folder from `multimodal embed`")
    parser.add_argument("--out", type=Path, required=True, help="the index folder to write (a new one)")
    parser.add_argument("--max_index_memory", default="4GB",
                        help="the most memory the index may take once loaded, as autofaiss reads it: 4GB, 512MB "
                             "(powers of 1024; the float16 vectors stay on disk, memory-mapped)")
    parser.add_argument("--kind", choices=("image", "text"), default=None,
                        help="index the folder's image or text embeddings (default: images where it has them)")
    parser.add_argument("--parts", default=None,
                        help="START:END: only these of the folder's parts (numbered from 0, END excluded), to build "
                             "the index in pieces and --merge them")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="index folders built with --parts from one embedding folder: merge them into --out")
    return parser


def index(argv: list[str]) -> int:
    args = index_parser().parse_args(argv)
    if (args.embeddings is None) == (args.merge is None):
        raise UserError("Pass an embedding folder to index, or --merge INDEX INDEX ... (not both).")
    if args.merge is not None and (args.parts or args.kind):
        raise UserError("--parts and --kind choose what a build indexes; a --merge takes them from its indexes.")
    check_output(args.out, "--out", "folder")
    if args.out.exists():
        raise UserError(f"--out {args.out} exists: choose a new folder, or delete it first.")
    for folder in args.merge or [args.embeddings]:
        what, how = ("Index", "pass folders written by `multimodal index`") if args.merge else \
            ("Embedding folder", "pass a folder written by `multimodal embed`")
        check_input(folder, what, how, "folder")
    from multimodal.eval.index import build_index, merge_indexes, parse_memory

    if args.merge is not None:
        merge_indexes(args.merge, args.out)
        return 0
    build_index(args.embeddings, args.out, parse_memory(args.max_index_memory), args.kind, _parts(args.parts))
    return 0


def _parts(text: str | None) -> tuple[int | None, int | None] | None:
    """--parts START:END as (START, END), either left out as None."""
    if text is None:
        return None
    start, colon, end = text.partition(":")
    if not colon or not all(re.fullmatch(r"\s*[0-9]*\s*", s) for s in (start, end)):
        raise UserError(f"--parts must be START:END, part numbers from 0 (END excluded; 0:4, 4:), got {text!r}.")
    return int(start) if start.strip() else None, int(end) if end.strip() else None


def _query_image(path: Path):
    """The --image query, decoded as embedding decodes images (the same size guard), or one sentence."""
    from multimodal.data.decode import decode_file
    from multimodal.data.faults import BadSample

    with reading(path):
        data = read_bytes(path)
    try:
        return decode_file(data)
    except BadSample as bad:
        raise UserError(f"{path} cannot be read as an image ({bad.kind}): pass a JPEG, PNG or WebP "
                        "image with --image.") from None


def plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal plot", description="Draw a run's curves, or evaluation "
                                     "results over training steps, to PNG.")
    parser.add_argument("run", type=Path, help="a run folder (runs/NAME/version_N) or its metrics.csv, or a folder "
                                               "of `multimodal eval --out` results")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG to write (default: RUN/curves.png; results.png in a results folder)")
    return parser


def plot(argv: list[str]) -> int:
    args = plot_parser().parse_args(argv)
    if args.out is not None:
        check_output(args.out, "--out", "file", PLOT_SUFFIXES)
    print(f"Wrote {plot_run(args.run, args.out)}")
    return 0


def models_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal models",
                                     description="List the architectures and their pretrained tags: open_clip's "
                                                 "and the project's own.")
    parser.add_argument("names", nargs="*", help="show only architectures or tags containing one of these "
                                                 "(case-insensitive): ViT-B-32, siglip, laion2b")
    parser.add_argument("--pretrained_only", action="store_true", help="only architectures with pretrained tags")
    return parser


def models(argv: list[str]) -> int:
    args = models_parser().parse_args(argv)
    import open_clip

    from multimodal import arch, pretrained

    tags, own = pretrained.tags(), set(arch.project_models())
    names = list(arch.project_models()) + [m for m in open_clip.list_models() if m not in own]
    wanted = [w.lower() for w in args.names]

    def shown(name: str) -> list[str] | None:
        """The tags of `name` to show, or None when the architecture is not listed."""
        its = tags.get(name, [])
        if args.pretrained_only and not its:
            return None
        if not wanted or any(w in name.lower() for w in wanted):
            return its
        matching = [t for t in its if any(w in t.lower() for w in wanted)]
        return matching or None

    rows = [(name, "project" if name in own else "open_clip", its) for name in names
            if (its := shown(name)) is not None]
    if not rows:
        raise UserError(f"No architecture or pretrained tag matches {' '.join(args.names)}: run `multimodal models` "
                        "for the whole list.")
    width = max(len(name) for name, _, _ in rows)
    for name, source, its in rows:
        print(f"{name:<{width}}  {source:<9}  {', '.join(its) or '-'}")
    print(f"{len(rows)} architectures, {sum(len(t) for _, _, t in rows)} pretrained tags. Use one as "
          "--model NAME --pretrained TAG; hf-hub:ORG/REPO names a Hugging Face repository.")
    return 0
