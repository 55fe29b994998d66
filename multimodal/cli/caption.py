"""`multimodal caption` and `multimodal eval captioning`: captions written by a CoCa model.

Paths are checked before torch, Lightning or open_clip is imported; the decoding settings right after
(`multimodal.decoding.Decoding.check`, one sentence each), and once the model is loaded, whether its
next-token logits fit in memory (`Decoding.peak_bytes` against `arch.memory_limit`). A failed write is one
sentence naming --out, and a run that captions no image ends with one, exit status 2.
"""

import argparse
from pathlib import Path

from multimodal.cli.args import (
    SEED_MAX,
    add_checkpoint_args,
    add_decode_arg,
    add_result_args,
    check_counts,
    check_result_args,
    check_seed,
    check_weights,
    dataset_name,
    load_model,
    provenance,
    write_result,
)
from multimodal.errors import UserError
from multimodal.paths import check_input, check_output
from multimodal.userfiles import writing

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GRID_IMAGES = 16
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
    parser.add_argument("--max_length", type=int, default=30,
                        help="tokens generated at most (and at most the model's context length - 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"random seed of the sampling strategies, 0 to {SEED_MAX}")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes")
    add_decode_arg(parser)


def _decoding(args: argparse.Namespace):
    from multimodal.decoding import Decoding

    decoding = Decoding(strategy=args.strategy, max_length=args.max_length, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, beams=args.beams, length_penalty=args.length_penalty)
    decoding.check(setting="--{}")
    check_seed(args)
    return decoding


def _check_fits(args: argparse.Namespace, model, decoding, source) -> None:
    """Refuse decoding settings whose logits would not fit beside the model (`Decoding.peak_bytes`), in one
    sentence naming the settings, the estimate and what to lower. A batch holds no more than a part of
    `source` (where their sizes are known)."""
    import dataclasses

    from multimodal.arch import gib, memory_limit

    sizes = [source.part_size(p) for p in range(source.num_parts())]
    batch = args.batch_size if None in sizes else min(args.batch_size, max(sizes, default=1))
    longest = min(decoding.max_length, model.architecture.context_length - 1)  # as caption_images caps it
    need = dataclasses.replace(decoding, max_length=longest).peak_bytes(batch, model.caption_vocab_size)
    limit, where = memory_limit(next(model.parameters()).device)
    room = limit - sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if need > room:
        beams = decoding.strategy == "beam"
        raise UserError(f"{f'--beams {decoding.beams} with ' if beams else ''}--batch_size {args.batch_size} and "
                        f"--max_length {longest} would hold about {gib(need)} of next-token logits, more than the "
                        f"{gib(max(room, 0))} left beside the model of the {gib(limit)} {where}: lower "
                        f"{'--beams, ' if beams else ''}--batch_size or --max_length.")


def _model(args: argparse.Namespace, decoding, source):
    """The model the arguments name, on the default device, which must be a CoCa model whose decoding of
    `source` with these settings fits in memory."""
    from multimodal.eval.captions import check_captioner
    from multimodal.eval.embed import default_device

    model = load_model(args).to(default_device())
    check_captioner(model, str(args.checkpoint or args.pretrained or args.model), setting="--{}")
    _check_fits(args, model, decoding, source)
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
    model = _model(args, decoding, source)
    settings = {"model": model.architecture.name, "weights": str(args.checkpoint or args.pretrained or args.model),
                "source": str(args.images or args.shards), "decoding": decoding.__dict__, "seed": args.seed}
    with writing(args.out):  # the parts beside it too: a full disk is one sentence, the parts done stay done
        writer = CaptionWriter(args.out, settings, args.overwrite, setting="--{}")
    todo = [p for p in range(source.num_parts()) if not writer.done(p)]
    print(f"{source.num_parts() - len(todo)} of {source.num_parts()} parts already done; captioning {len(todo)}.")
    sizes = [source.part_size(p) for p in todo]
    captioned = 0
    with tqdm(total=sum(sizes) if None not in sizes else None, unit="img", desc="captioning", mininterval=1.0) as bar:
        for batch, captions in caption_source(model, source, todo, decoding, args.seed, args.batch_size,
                                              args.num_workers, args.decode):
            with writing(args.out):
                captioned += len(writer.add(batch, captions))
            bar.update(len(captions))
    if not captioned and len(todo) == source.num_parts():  # its empty parts would pass for done on a rerun
        import shutil

        shutil.rmtree(writer.folder, ignore_errors=True)
        raise _nothing_captioned(args)
    with writing(args.out):
        count = writer.finish(source.num_parts())
    if not count:  # resumed, and the parts done before hold none either
        raise _nothing_captioned(args)
    print(f"Wrote {count} captions to {args.out}")
    if args.grid is not None:
        _grid(args)
    return 0


def _nothing_captioned(args: argparse.Namespace) -> UserError:
    return UserError(f"No image of {args.images or args.shards} could be read, so no caption was written: check "
                     "the images (the warnings above name the ones skipped).")


def _grid(args: argparse.Namespace) -> None:
    """A contact sheet of the first images of --out with their captions."""
    import itertools
    import json

    from multimodal.eval.search import captioned_sheet
    from multimodal.files import save_image

    with args.out.open(encoding="utf-8") as lines:
        rows = [json.loads(line) for line in itertools.islice(lines, GRID_IMAGES)]
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
    model = _model(args, decoding, source)
    with tqdm(total=source.shards.num_samples, unit="img", desc="captioning", mininterval=1.0) as bar:
        def counted(batches):
            for batch, captions in batches:
                bar.update(len(captions))
                yield batch, captions

        candidates, references, rows = collect_captions(counted(caption_source(
            model, source, list(range(source.num_parts())), decoding, args.seed, args.batch_size, args.num_workers,
            args.decode)))
    metrics = caption_metrics(candidates, references)
    print(f"Captioning {len(candidates)} images ({decoding.strategy}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.captions is not None:
        with writing(args.captions):
            write_text(args.captions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"Wrote {args.captions}")
    record = results.result("captioning", dataset_name(args, args.shards), metrics=metrics,
                            **provenance(model.architecture.name, args.pretrained, args.checkpoint),
                            num_images=len(candidates), decoding=decoding.__dict__)
    write_result(args, record)
    return 0
