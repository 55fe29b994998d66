"""`multimodal export` and `multimodal eval {retrieval,zeroshot}` (`multimodal embed`: cli/embed.py).

Each command parses and checks its arguments first and imports torch, Lightning and open_clip only
then: `--help` and a mistake in the arguments answer at once.
"""

import argparse
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
