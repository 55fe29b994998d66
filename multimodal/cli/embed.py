"""`multimodal embed`: image and text embeddings of a source into an embedding folder (local or a bucket), part
by part, resumable; one process, --devices on a node, or every rank of torchrun or srun taking its own parts.

Parses and checks its arguments first and imports torch, Lightning and open_clip only then: `--help` and a
mistake in the arguments answer at once.
"""

import argparse
import os
import re
import shutil
from pathlib import Path

from multimodal.cli.args import (
    add_checkpoint_args,
    add_decode_arg,
    add_preprocess_arg,
    add_shard_args,
    check_counts,
    check_preprocess,
    check_weights,
    load_model,
    preprocess_of,
    shard_source,
)
from multimodal.errors import UserError
from multimodal.files import write_json
from multimodal.paths import check_input, check_output
from multimodal.userfiles import writing


def _check_source(args) -> None:
    given = [name for name in ("shards", "images", "texts") if getattr(args, name, None)]
    if len(given) != 1:
        raise UserError("Pass exactly one of --shards, --images or --texts.")
    if args.images:
        check_input(args.images, "Image folder", "pass a folder of images with --images", kind="folder")
    if args.texts:
        check_input(args.texts, "Text file", "pass a file with one text a line with --texts")


def _source(args):
    from multimodal.data.sources import ImageFolderSource, ShardSource, TextFileSource

    if args.shards:
        return ShardSource(shard_source(args).shards, json=True)  # the samples' json fields kept for metadata/
    if args.images:
        return ImageFolderSource(args.images, args.part_size)
    return TextFileSource(args.texts, args.part_size)


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal embed", description="Compute image and/or text embeddings.")
    add_checkpoint_args(parser)
    add_shard_args(parser, "shards to embed (images and all their captions)")
    parser.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("--texts", type=Path, help="a text file, one text a line")
    parser.add_argument("--out", required=True,
                        help="embedding folder to write (resumed if present): a path, or a URL such as s3://bucket/emb")
    parser.add_argument("--parts", help="START:END: only these parts of the source (numbered from 0, END excluded; "
                                        "START: to the last), for runs side by side into one --out")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--part_size", type=int, default=10000, help="items per part for --images / --texts")
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes per device")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices on this node (several: DDP, one part set each); under torchrun or srun, the "
                             "processes the launcher started instead")
    add_decode_arg(parser)
    add_preprocess_arg(parser)
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an --out made by another run")
    return parser


def _part_range(parts: str | None) -> tuple[int, int | None]:
    """(START, END or None) of --parts."""
    if parts is None:
        return 0, None
    found = re.fullmatch(r"(\d+):(\d*)", parts.strip())
    if not found:
        raise UserError(f"--parts must be START:END, parts numbered from 0 with END excluded (0:100; 100: for the "
                        f"rest), got '{parts}'.")
    start, end = int(found.group(1)), int(found.group(2)) if found.group(2) else None
    if end is not None and end <= start:
        raise UserError(f"--parts {parts} holds no part: END must be greater than START.")
    return start, end


def _ranks(devices: int) -> tuple[int, int, int]:
    """(global rank, world size, processes a node) of this process: a launcher's (torchrun's RANK and
    WORLD_SIZE, srun's SLURM_PROCID and SLURM_NTASKS, read as Lightning reads them), else the rank that
    Lightning's own launcher gave a process of --devices (LOCAL_RANK), or 0 of --devices."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun; Lightning's own launcher sets no RANK
        world = int(env["WORLD_SIZE"])
        rank, per_node = int(env["RANK"]), int(env.get("LOCAL_WORLD_SIZE", world))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env \
            and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
        per_node = world // int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    else:
        return int(env.get("NODE_RANK", "0")) * devices + int(env.get("LOCAL_RANK", "0")), devices, devices
    if devices not in (1, per_node) or world % per_node:
        raise UserError(f"--devices {devices} does not match the launcher's {world} processes, {per_node} a node: "
                        "leave --devices out under torchrun or srun, which start a process a device.")
    return rank, world, per_node


def embed(argv: list[str]) -> int:
    args = embed_parser().parse_args(argv)
    check_counts(args, positive=("batch_size", "part_size", "devices"), non_negative=("num_workers",))
    _part_range(args.parts)
    _check_source(args)
    check_preprocess(args)
    check_weights(args)
    from multimodal.remote import is_url

    if not is_url(args.out):
        check_output(Path(args.out), "--out", "folder")
    return _embed(args, *_ranks(args.devices))


def _embed(args: argparse.Namespace, rank: int, world: int, per_node: int) -> int:
    """Rank `rank` of `world` embeds the parts of --parts numbered `rank` modulo `world` (a single run: every
    part) that are not done, each written as it is finished."""
    import pytorch_lightning as pl
    import torch

    from multimodal.data.batch import jpegs_on_device
    from multimodal.data.sources import EvalBatches
    from multimodal.eval.bucket import Bucket
    from multimodal.eval.callbacks import EmbeddingWriter, EmbedModule
    from multimodal.eval.embed import PartWriter, claim
    from multimodal.remote import is_url

    source = _source(args)
    start, end = _part_range(args.parts)
    if start >= source.num_parts():
        raise UserError(f"--parts {args.parts} starts past the last part: {args.shards or args.images or args.texts} "
                        f"has {source.num_parts()} parts, numbered from 0.")
    parts = range(start, min(end or source.num_parts(), source.num_parts()))
    model = load_model(args)
    bucket = Bucket(args.out) if is_url(args.out) else None
    if bucket:
        bucket.check_writable()
    out = bucket.local if bucket else Path(args.out)
    writer = PartWriter(out, model.architecture.embed_dim, args.dtype, images=source.has_images,
                        texts=source.has_texts, publish=bucket.publish if bucket else None)
    with claim(out, "--out") as held:
        _claim_folder(held, _info(args, model), args.overwrite, bucket)
        done = (lambda p, listed=bucket.done(writer.kinds): p in listed) if bucket else writer.done
        done_before = [p for p in parts if done(p)]
        mine = [p for p in parts if p % world == rank]
        todo = held.parts(mine, done)
        if bucket:
            writer.discard(todo)  # what a run killed before uploading them left in the working copy
        if rank == 0:
            print(f"{len(done_before)} of {len(parts)} parts already done; embedding {len(parts) - len(done_before)}.")
        if len(done_before) == len(parts):
            return 0
        preprocess, tokenizer = preprocess_of(args, model), model.architecture.tokenizer
        gpu = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        on_device = jpegs_on_device(args.decode, torch.device("cuda" if gpu else "cpu"))
        sizes = [source.part_size(p) for p in todo]
        trainer = pl.Trainer(
            accelerator=args.accelerator, devices=per_node, num_nodes=world // per_node,
            strategy="ddp" if world > 1 else "auto", precision="bf16-mixed" if gpu else "32-true", logger=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[EmbeddingWriter(writer, sum(sizes) if None not in sizes else None,
                                       "img" if source.has_images else "text")],
        )
        # Each process made its own list of parts: Lightning's rank is the one `_ranks` read.
        trainer.predict(EmbedModule(model, lambda r, w: EvalBatches(source, todo, preprocess, tokenizer,
                                                                    args.batch_size, on_device),
                                    args.num_workers, preprocess), return_predictions=False)
        rows, before = trainer.strategy.reduce(  # over the ranks: each wrote its own parts
            torch.tensor([float(writer.rows_written), float(len(mine) - len(todo))],
                         device=trainer.strategy.root_device), reduce_op="sum").tolist()
        if not rows and not before and len(parts) == source.num_parts():
            # Every sample skipped: the empty parts are not kept as done, so that the same command redoes them
            # (a bucket's too: each was uploaded as it was finished).
            writer.discard(todo)
            if bucket:
                bucket.discard([file for part in todo for file in writer.files(part)])
            raise UserError(f"No sample of {args.shards or args.images or args.texts} could be read, so nothing was "
                            "embedded: mend or replace the files skipped (named above), then run the command again.")
    if rank == 0:
        print(f"Wrote {args.out} (parts {parts.start} to {parts.stop - 1}, on {world} device(s)).")
    return 0


def _info(args: argparse.Namespace, model) -> dict:
    """What made the folder: resumed, or shared by runs side by side, only by runs with the same (not by
    --parts, --devices or the launcher's ranks: any split of the work writes the same folder)."""
    return {"model": model.architecture.name,
            "checkpoint": str(args.checkpoint.resolve()) if args.checkpoint else None,
            **({"pretrained": args.pretrained} if args.pretrained else {}), "dtype": args.dtype,
            "source": {k: str(getattr(args, k)) for k in ("shards", "images", "texts") if getattr(args, k)},
            **({"members": {k: getattr(args, k) for k in ("split", "image_key", "text_key", "caption_field")
                            if getattr(args, k) is not None}} if args.shards else {}),
            **({"preprocess": args.preprocess} if args.preprocess != "fast" else {}),
            "part_size": args.part_size, "dim": model.architecture.embed_dim}


def _claim_folder(held, info: dict, overwrite: bool, bucket) -> None:
    """Resume only a folder written by the same model, source and settings (a bucket's: the info.json it
    holds); every run of them writes info.json alike."""
    from multimodal.eval.bucket import SUBFOLDERS
    from multimodal.eval.embed import LOCK, settings_changed

    out, existing = held.out, held.out / "info.json"
    with held.settings():
        foreign = bucket.pull_info() if bucket else any(p.name != LOCK for p in out.iterdir())
        if existing.is_file():
            if settings_changed(existing, info, overwrite, "embeddings", "--{}", bucket.url if bucket else None):
                if held.others_writing():
                    raise UserError(f"{bucket.url if bucket else out} is being written by another run right now: "
                                    "wait for it to end before replacing it with --overwrite, or choose another --out.")
                for sub in SUBFOLDERS:
                    shutil.rmtree(out / sub, ignore_errors=True)
                if bucket:
                    bucket.clear()
            else:
                return
        elif foreign and not overwrite:
            raise UserError(f"{bucket.url if bucket else out} is not empty and is not an embedding folder: choose "
                            "another --out, or pass --overwrite to write into it.")
        with writing(existing):
            write_json(existing, info)
        if bucket:  # the bucket had none, or one of other settings
            bucket.push_info()
