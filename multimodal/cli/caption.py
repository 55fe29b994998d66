"""`multimodal caption` and `multimodal eval captioning`: captions written by a CoCa model.

Paths are checked before torch, Lightning or open_clip is imported; the decoding settings right after
(`multimodal.decoding.Decoding.check`, one sentence each).
"""

import argparse
from pathlib import Path

from multimodal.cli.args import (
    add_checkpoint_args,
    add_decode_arg,
    add_result_args,
    check_counts,
    check_result_args,
    check_weights,
    dataset_name,
    load_model,
    provenance,
    write_result,
)
from multimodal.errors import UserError
from multimodal.paths import check_input, check_output

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", default="beam", choices=("greedy", "top_k", "top_p", "beam"),
                        help="how each next token is chosen: the most likely (greedy), sampled among the k most "
                             "likely (top_k) or the smallest set with probability top_p (top_p), or beam search")
    parser.add_argument("--top_k", type=int, default=50, help="top_k: sample among this many tokens")
    parser.add_argument("--top_p", type=float, default=0.9, help="top_p: the probability mass sampled from, in (0, 1]")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling: logits divided by this (0: greedy)")
    parser.add_argument("--beams", type=int, default=4, help="beam: sequences kept")
    parser.add_argument("--length_penalty", type=float, default=1.0,
                        help="beam: a sequence's log-probability is divided by its length to this power")
    parser.add_argument("--max_length", type=int, default=30, help="tokens generated at most")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling strategies")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes")
    add_decode_arg(parser)


def _decoding(args: argparse.Namespace):
    from multimodal.decoding import Decoding

    decoding = Decoding(strategy=args.strategy, max_length=args.max_length, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, beams=args.beams, length_penalty=args.length_penalty)
    decoding.check()
    return decoding


def _model(args: argparse.Namespace):
    """The model the arguments name, on the default device, which must be a CoCa model."""
    from multimodal.eval.captions import check_captioner
    from multimodal.eval.embed import default_device

    model = load_model(args).to(default_device())
    check_captioner(model, str(args.checkpoint or args.pretrained or args.model), setting="--{}")
    return model


def caption_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal caption", description="Write captions of images with a CoCa "
                                     "model.")
    add_checkpoint_args(parser)
    parser.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("--shards", help="shards to caption")
    parser.add_argument("--out", type=Path, required=True,
                        help="captions.jsonl to write, one {key, ..., caption} a line (resumed if interrupted)")
    parser.add_argument("--grid", type=Path, default=None,
                        help="also write a contact sheet of the first images with their captions")
    parser.add_argument("--part_size", type=int, default=1000, help="images per resumable part for --images")
    parser.add_argument("--overwrite", action="store_true", help="start afresh where another run's parts lie")
    add_decoding_args(parser)
    return parser


def caption(argv: list[str]) -> int:
    args = caption_parser().parse_args(argv)
    check_counts(args, positive=("batch_size", "part_size"), non_negative=("num_workers",))
    if bool(args.images) == bool(args.shards):
        raise UserError("Pass exactly one of --images or --shards.")
    if args.images:
        check_input(args.images, "Image folder", "pass a folder of images with --images", kind="folder")
    check_output(args.out, "--out", "file", (".jsonl",))
    if args.grid is not None:
        check_output(args.grid, "--grid", "file", GRID_SUFFIXES)
    check_weights(args)
    decoding = _decoding(args)
    from tqdm import tqdm

    from multimodal.data.sources import ImageFolderSource, ShardSource
    from multimodal.eval.captions import CaptionWriter, caption_source

    source = ImageFolderSource(args.images, args.part_size) if args.images else ShardSource(args.shards)
    model = _model(args)
    settings = {"model": model.architecture.name, "weights": str(args.checkpoint or args.pretrained or args.model),
                "source": str(args.images or args.shards), "decoding": decoding.__dict__, "seed": args.seed}
    writer = CaptionWriter(args.out, settings, args.overwrite, setting="--{}")
    todo = [p for p in range(source.num_parts()) if not writer.done(p)]
    print(f"{source.num_parts() - len(todo)} of {source.num_parts()} parts already done; captioning {len(todo)}.")
    sizes = [source.part_size(p) for p in todo]
    bar = tqdm(total=sum(sizes) if None not in sizes else None, unit="img", desc="captioning", mininterval=1.0)
    shown = []
    for batch, captions in caption_source(model, source, todo, decoding, args.seed, args.batch_size,
                                          args.num_workers, args.decode):
        rows = writer.add(batch, captions)
        bar.update(len(rows))
        shown.extend(rows[:max(0, 16 - len(shown))])
    bar.close()
    print(f"Wrote {writer.finish(source.num_parts())} captions to {args.out}")
    if args.grid is not None:
        _grid(args, shown)
    return 0


def _grid(args: argparse.Namespace, rows: list[dict]) -> None:
    """A contact sheet of captioned images (the first ones captioned in this run)."""
    if not rows:
        print("No image was captioned in this run: no --grid written.")
        return
    from multimodal.eval.search import captioned_sheet
    from multimodal.files import save_image
    from multimodal.userfiles import writing

    sheet = captioned_sheet(rows)
    with writing(args.grid):
        save_image(sheet, args.grid)
    print(f"Wrote {args.grid}")


def eval_captioning_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal eval captioning",
                                     description="BLEU-4 and CIDEr of a CoCa model's captions against all "
                                                 "the reference captions of each image.")
    add_checkpoint_args(parser)
    parser.add_argument("--shards", required=True, help="shards whose images carry their reference captions")
    parser.add_argument("--captions", type=Path, default=None, help="also write the generated captions here (.jsonl)")
    add_decoding_args(parser)
    add_result_args(parser)
    return parser


def eval_captioning(argv: list[str]) -> int:
    args = eval_captioning_parser().parse_args(argv)
    check_counts(args, positive=("batch_size",), non_negative=("num_workers",))
    check_result_args(args)
    if args.captions is not None:
        check_output(args.captions, "--captions", "file", (".jsonl",))
    check_weights(args)
    decoding = _decoding(args)
    import json

    from tqdm import tqdm

    from multimodal.data.sources import ShardSource
    from multimodal.eval import results
    from multimodal.eval.captioning import caption_metrics
    from multimodal.eval.captions import caption_source, collect_captions
    from multimodal.files import write_text

    source = ShardSource(args.shards)
    model = _model(args)
    bar = tqdm(total=source.shards.num_samples, unit="img", desc="captioning", mininterval=1.0)

    def counted(batches):
        for batch, captions in batches:
            bar.update(len(captions))
            yield batch, captions

    candidates, references, rows = collect_captions(counted(caption_source(
        model, source, list(range(source.num_parts())), decoding, args.seed, args.batch_size, args.num_workers,
        args.decode)))
    bar.close()
    metrics = caption_metrics(candidates, references)
    print(f"Captioning {len(candidates)} images ({decoding.strategy}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.captions is not None:
        write_text(args.captions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"Wrote {args.captions}")
    record = results.result("captioning", dataset_name(args, args.shards), metrics=metrics,
                            **provenance(model.architecture.name, args.pretrained, args.checkpoint),
                            num_images=len(candidates), decoding=decoding.__dict__)
    write_result(args, record)
    return 0
