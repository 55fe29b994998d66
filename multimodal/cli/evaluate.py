"""`multimodal export`, `multimodal embed` and `multimodal eval {retrieval,zeroshot}`.

Each command parses and checks its arguments first and imports torch, Lightning and open_clip only
then: `--help` and a mistake in the arguments answer at once.
"""

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from multimodal.cli.args import (
    add_checkpoint_args,
    add_decode_arg,
    add_preprocess_arg,
    add_result_args,
    add_shard_args,
    check_counts,
    check_preprocess,
    check_result_args,
    check_weights,
    dataset_name,
    load_model,
    preprocess_of,
    provenance,
    shard_source,
    weights_given,
    write_result,
)
from multimodal.errors import UserError
from multimodal.eval import presets
from multimodal.files import write_json
from multimodal.paths import EXPORT_SUFFIXES, check_input, check_output
from multimodal.userfiles import writing


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal export",
                                     description="Write trained towers as an open_clip state dict.")
    add_checkpoint_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="output file: .safetensors (default) or .pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file, and a different file where the model config goes "
                             "beside it (ARCH.json, for the project's own architectures)")
    return parser


def export(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    check_output(args.out, "--out", "file", EXPORT_SUFFIXES)
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists: pass --overwrite to replace it, or choose another --out.")
    check_weights(args)
    from multimodal import weights

    model = load_model(args)
    with writing(args.out):
        written = weights.export(model, args.out, args.overwrite, setting="--{}")
    for path in written:
        print(f"Wrote {path}")
    if len(written) > 1:
        print(f"Load it with: open_clip.add_model_config('{written[1]}'); "
              f"open_clip.create_model_and_transforms('{written[1].stem}', pretrained='{args.out}')")
    else:
        print(f"Load it with: open_clip.create_model_and_transforms('{model.architecture.open_clip_name}', "
              f"pretrained='{args.out}')")
    return 0


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
            # Every sample skipped: the empty parts are not kept as done, so that the same command redoes them.
            writer.discard(todo)
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
        pulled = bucket.pull_info() if bucket else None
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
        elif not bucket and any(p.name != LOCK for p in out.iterdir()) and not overwrite:
            raise UserError(f"{out} is not empty and is not an embedding folder: choose another --out.")
        with writing(existing):
            write_json(existing, info)
        if bucket and existing.read_bytes() != pulled:
            bucket.push_info()


def eval_retrieval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal eval retrieval",
                                     description="Zero-shot image<->text retrieval recall@k.")
    add_checkpoint_args(parser, required=False, help="model to embed --shards with")
    add_shard_args(parser, "shards with several captions per image")
    parser.add_argument("--embeddings", type=Path, help="an embedding folder written by `multimodal embed --shards`")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10],
                        help="the k of each recall@k, 1 or more (a k given twice counts once)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--chunk_size", type=int, default=4096, help="block size of the score computation")
    add_decode_arg(parser)
    add_preprocess_arg(parser)
    add_result_args(parser)
    return parser


def eval_retrieval(argv: list[str]) -> int:
    args = eval_retrieval_parser().parse_args(argv)
    check_counts(args, positive=("batch_size", "chunk_size"), non_negative=("num_workers",))
    if any(k < 1 for k in args.ks):
        raise UserError(f"--ks must be positive integers, the k of each recall@k, got {' '.join(map(str, args.ks))}.")
    ks = tuple(dict.fromkeys(args.ks))
    check_result_args(args)
    check_preprocess(args)
    if bool(args.shards) == bool(args.embeddings):
        raise UserError("Pass either --shards (with --checkpoint) or --embeddings.")
    if args.shards and not weights_given(args):
        raise UserError("--shards needs a model to embed them with: --checkpoint, or --model with --pretrained.")
    if args.shards:
        check_weights(args)
    else:
        check_input(args.embeddings, "Embedding folder", "pass a folder written by `multimodal embed`", kind="folder")
    from multimodal.eval import results
    from multimodal.eval.embed import embed_shards, load_folder, read_info
    from multimodal.eval.retrieval import evaluate_embeddings, table

    benchmark = None
    if args.shards:
        source = shard_source(args)
        benchmark = source.shards.benchmark
        model = load_model(args)
        emb = embed_shards(model, source, args.batch_size, args.num_workers, decode=args.decode,
                           preprocess=preprocess_of(args, model))
        weights_fields = provenance(model.architecture.name, args.pretrained, args.checkpoint)
    else:
        emb = load_folder(args.embeddings)
        info = read_info(args.embeddings)
        weights_fields = provenance(info["model"], info.get("pretrained"), info.get("checkpoint"))
    metrics, num_images, num_texts = evaluate_embeddings(emb, ks, args.chunk_size)
    print(f"Retrieval over {num_images} images and {num_texts} captions")
    print(table(metrics, num_images, num_texts, ks))
    record = results.result("zeroshot_retrieval", dataset_name(args, args.shards or args.embeddings, benchmark),
                            metrics=metrics,
                            **weights_fields, num_images=num_images, num_texts=num_texts)
    write_result(args, record)
    return 0


def _labelled_source(args):
    from multimodal.data.sources import ClassFolderSource

    return ClassFolderSource(args.images) if args.images else shard_source(args, labels=True)


def eval_zeroshot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal eval zeroshot", description="Zero-shot classification.")
    add_checkpoint_args(parser)
    parser.add_argument("--preset", choices=tuple(presets.PRESETS),
                        help="the class names and templates of the CLIP paper for this dataset, as CLIP_benchmark "
                             "uses them (instead of --classnames; --templates replaces its templates)")
    parser.add_argument("--classnames", type=Path,
                        help="class names, one a line, in label order; for --images the sorted order of the "
                             "class folders (default for --images: the folder names)")
    parser.add_argument("--templates", type=Path, default=None,
                        help="prompt templates with {} or {c} for the class name, one a line (default: the "
                             "--preset's, else a CLIP_benchmark folder's, else a built-in set)")
    add_shard_args(parser, "shards whose samples carry a class index (a `cls` member)", labels=True)
    parser.add_argument("--images", type=Path, help="an ImageFolder-style folder: FOLDER/CLASS/IMAGE")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes")
    add_decode_arg(parser)
    add_preprocess_arg(parser)
    add_result_args(parser)
    return parser


def eval_zeroshot(argv: list[str]) -> int:
    args = eval_zeroshot_parser().parse_args(argv)
    check_counts(args, positive=("batch_size",), non_negative=("num_workers",))
    check_result_args(args)
    if bool(args.shards) == bool(args.images):
        raise UserError("Pass either --shards or --images.")
    if args.preset and args.classnames:
        raise UserError(f"Pass --preset or --classnames, not both: preset {args.preset} names the classes.")
    if args.images:
        check_input(args.images, "Image folder", "pass an ImageFolder-style folder with --images", kind="folder")
    for option, path in (("Class names file", args.classnames), ("Templates file", args.templates)):
        if path is not None:
            check_input(path, option, "pass a text file with one entry a line")
    check_preprocess(args)
    check_weights(args)
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from multimodal.data.batch import jpegs_on_device
    from multimodal.data.sources import EvalBatches
    from multimodal.eval import results, zeroshot
    from multimodal.eval.embed import autocast, default_device

    source = _labelled_source(args)
    benchmark = source.shards.benchmark if args.shards else None
    classnames, templates = zeroshot.classes_and_templates(source, args.preset, args.classnames, args.templates,
                                                           setting="--{}")
    device = default_device()
    model = load_model(args).to(device)
    preprocess = preprocess_of(args, model)
    batches = EvalBatches(source, list(range(source.num_parts())), preprocess, model.architecture.tokenizer,
                          args.batch_size, jpegs_on_device(args.decode, device))
    loader = DataLoader(batches, batch_size=None, num_workers=min(args.num_workers, source.num_parts()),
                        pin_memory=device.type == "cuda")
    with autocast(device):
        result = zeroshot.evaluate(model, classnames, templates, tqdm(loader, unit="batch", desc="classifying",
                                                                      mininterval=1.0), preprocess)
    print(f"Zero-shot classification of {result['num_images']} images into {len(classnames)} classes "
          f"({len(templates)} templates): top-1 {result['acc1']:.4f}, top-5 {result['acc5']:.4f}, "
          f"mean per-class recall {result['mean_per_class_recall']:.4f}")
    metrics = {k: result[k] for k in ("acc1", "acc5", "mean_per_class_recall")}
    record = results.result("zeroshot_classification",
                            args.dataset or args.preset or dataset_name(args, args.shards or args.images, benchmark),
                            metrics=metrics, **provenance(model.architecture.name, args.pretrained, args.checkpoint),
                            num_images=result["num_images"], num_classes=result["num_classes"])
    write_result(args, record)
    return 0


def evaluate(argv: list[str]) -> int:
    from multimodal.cli import nearest
    from multimodal.cli.caption import eval_captioning
    from multimodal.cli.probe import eval_linear_probe

    commands = {"retrieval": eval_retrieval, "zeroshot": eval_zeroshot, "linear_probe": eval_linear_probe,
                "captioning": eval_captioning}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: multimodal eval {retrieval,zeroshot,linear_probe,captioning} ...  (add --help for options)",
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in commands:
        raise UserError(f"Unknown eval command '{argv[0]}'{nearest(argv[0], commands)}: "
                        f"use one of {', '.join(commands)}.")
    return commands[argv[0]](argv[1:])
