"""`multimodal search`, `multimodal plot` and `multimodal models`: what a model finds, how a run went,
which architectures and published weights there are.

Arguments are parsed and checked before torch, open_clip or matplotlib is imported.
"""

import argparse
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
    parser = argparse.ArgumentParser(prog="multimodal search", description="Search an embedding folder.")
    parser.add_argument("--index", type=Path, required=True, help="an embedding folder from `multimodal embed`")
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
    check_input(args.index, "Embedding folder", "pass a folder written by `multimodal embed` with --index", "folder")
    if args.image is not None:
        check_input(args.image, "Query image", "pass an image file with --image")
    check_weights(args)
    import torch

    from multimodal import weights
    from multimodal.data.pixels import EvalTransform
    from multimodal.eval.embed import load_folder, read_info
    from multimodal.eval.search import contact_sheet, first_captions, load_images, top_k

    query_image = _query_image(args.image) if args.image is not None else None
    info = read_info(args.index, setting="--{}")
    emb = load_folder(args.index)
    if not (emb.image_features.shape[0] or emb.text_features.shape[0]):
        raise UserError(f"{args.index} holds no embeddings to search (every sample was skipped when it was made): "
                        "embed readable images or texts with `multimodal embed`.")
    target = args.target or ("images" if emb.image_features.shape[0] else "texts")
    candidates = emb.image_features if target == "images" else emb.text_features
    if candidates.shape[0] == 0:
        other = "texts" if target == "images" else "images"
        raise UserError(f"{args.index} holds no {target[:-1]} embeddings to search: search its {other} with "
                        f"--target {other}.")
    model = load_model(args) if weights_given(args) else \
        weights.load_model(info["checkpoint"], args.model or info["model"], pretrained=info.get("pretrained"),
                           cache_dir=args.cache_dir, setting="--{}")
    model.eval()
    with torch.no_grad():
        if args.text:
            query = model.encode_text(model.architecture.tokenizer([args.text]))[0]
        else:
            query = model.encode_image(EvalTransform.of(model.architecture.preprocessing)(query_image)[None])[0]
    if query.shape[0] != candidates.shape[1]:
        raise UserError(f"The model gives {query.shape[0]}-d embeddings but {args.index} holds "
                        f"{candidates.shape[1]}-d ones: pass the --checkpoint the folder was made with.")
    hits = top_k(candidates, query, args.k)
    rows = emb.image_rows if target == "images" else emb.text_rows
    captions = first_captions(emb) if target == "images" else {}
    print(f"{'rank':>4} {'score':>7}  match")
    for rank, (row, score) in enumerate(hits, start=1):
        meta = rows[row]
        what = meta.get("file_name") or meta.get("caption") or captions.get(row, "")
        print(f"{rank:>4} {score:7.4f}  {meta.get('key', row)}  {what}")
    if args.grid:
        if target != "images":
            raise UserError("--grid draws images: search --target images.")
        images = load_images(emb, [row for row, _ in hits])
        title = f'"{args.text}"' if args.text else f"like {args.image.name}"
        sheet = contact_sheet([(title, [(im, f"{score:.3f}") for im, (_, score) in zip(images, hits)])])
        with writing(args.grid):
            save_image(sheet, args.grid)
        print(f"Wrote {args.grid}")
    return 0


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
