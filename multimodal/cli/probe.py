"""`multimodal eval linear_probe`: CLIP_benchmark's linear probe task. Image features of a training and a
test split, computed once, then `eval.linear_probe.probe` (logistic regression with its weight-decay sweep on
a validation split); the result in CLIP_benchmark's layout."""

import argparse
import math
from pathlib import Path

from multimodal.cli.args import (
    SEED_MAX,
    add_checkpoint_args,
    add_decode_arg,
    add_preprocess_arg,
    add_result_args,
    add_shard_args,
    check_counts,
    check_preprocess,
    check_result_args,
    check_seed,
    check_weights,
    dataset_name,
    load_model,
    preprocess_of,
    provenance,
    shard_source,
    write_result,
)
from multimodal.errors import UserError
from multimodal.paths import check_input


def linear_probe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal eval linear_probe",
                                     description="A linear classifier on frozen image features (CLIP_benchmark's "
                                                 "linear_probe task).")
    add_checkpoint_args(parser)
    add_shard_args(parser, "the test split's shards, whose samples carry a class index (a `cls` member), or a "
                           "CLIP_benchmark classification dataset's folder (its --train_split trains)", labels=True)
    parser.add_argument("--train_split", default="train", help="the training split of a CLIP_benchmark dataset folder")
    parser.add_argument("--train_shards", default=None, help="the training split's shards (default: --train_split "
                                                             "of the --shards dataset folder)")
    parser.add_argument("--images", type=Path, help="the test split as an ImageFolder-style folder: FOLDER/CLASS/IMAGE")
    parser.add_argument("--train_images", type=Path, help="the training split as an ImageFolder-style folder")
    parser.add_argument("--val_proportion", type=float, default=None,
                        help="hold out this share of the training split to choose the weight decay (CLIP_benchmark's "
                             "--val_proportion); without it the weight decay is 0")
    parser.add_argument("--fewshot_k", type=int, default=-1, help="training images a class (-1: all)")
    parser.add_argument("--lr", type=float, default=0.1, help="the probe's learning rate")
    parser.add_argument("--epochs", type=int, default=10, help="the probe's training epochs")
    parser.add_argument("--seed", type=int, default=0, help=f"the probe's random seed, 0 to {SEED_MAX}")
    parser.add_argument("--no_normalize", action="store_true", help="train on the features as the model gives them")
    parser.add_argument("--batch_size", type=int, default=64, help="images a batch, when embedding and training")
    parser.add_argument("--num_workers", type=int, default=4, help="data loading processes")
    add_decode_arg(parser)
    add_preprocess_arg(parser)
    add_result_args(parser)
    return parser


def _sources(args):
    """(training source, test source): class folders, or labelled shards (a dataset folder's two splits)."""
    from multimodal.data.sources import ClassFolderSource

    if args.images:
        train, test = ClassFolderSource(args.train_images), ClassFolderSource(args.images)
        if train.classes != test.classes:  # each numbers its own sorted class folders
            only = sorted(set(train.classes) ^ set(test.classes))
            raise UserError(f"{args.train_images} and {args.images} have different class folders ({', '.join(only[:3])}"
                            f"{', ...' if len(only) > 3 else ''} in one only): their labels would not agree.")
        return train, test
    test = shard_source(args, labels=True)
    train_args = argparse.Namespace(**{**vars(args), "shards": args.train_shards or args.shards,
                                       "split": args.train_split})
    if args.train_shards is None and test.shards.benchmark is None:
        raise UserError("--shards is not a CLIP_benchmark dataset folder with splits: pass the training split's "
                        "shards with --train_shards.")
    return shard_source(train_args, labels=True), test


def eval_linear_probe(argv: list[str]) -> int:
    args = linear_probe_parser().parse_args(argv)
    check_counts(args, positive=("batch_size", "epochs"), non_negative=("num_workers",))
    check_result_args(args)
    check_preprocess(args)
    if bool(args.shards) == bool(args.images) or bool(args.images) != bool(args.train_images):
        raise UserError("Pass --shards (with --train_shards, or a CLIP_benchmark dataset folder), or --images with "
                        "--train_images.")
    for option, path in (("--images", args.images), ("--train_images", args.train_images)):
        if path is not None:
            check_input(path, "Image folder", f"pass an ImageFolder-style folder with {option}", kind="folder")
    if not 0 < args.lr < math.inf or (args.val_proportion is not None and not 0 < args.val_proportion < 1):
        raise UserError("--lr must be a positive finite number and --val_proportion between 0 and 1.")
    if args.fewshot_k == 0 or args.fewshot_k < -1:
        raise UserError(f"--fewshot_k {args.fewshot_k} is no number of images a class: give a positive one, or -1 "
                        "for all of them.")
    check_seed(args)
    check_weights(args)
    from torch.utils.data import DataLoader

    from multimodal.data.batch import jpegs_on_device
    from multimodal.data.sources import EvalBatches
    from multimodal.eval import results
    from multimodal.eval.embed import autocast, default_device, labelled_features
    from multimodal.eval.linear_probe import probe

    train, test = _sources(args)
    device = default_device()
    model = load_model(args).to(device)
    preprocess = preprocess_of(args, model)

    def features(source):
        batches = EvalBatches(source, list(range(source.num_parts())), preprocess, model.architecture.tokenizer,
                              args.batch_size, jpegs_on_device(args.decode, device))
        loader = DataLoader(batches, batch_size=None, num_workers=min(args.num_workers, source.num_parts()),
                            pin_memory=device.type == "cuda")
        with autocast(device):
            return labelled_features(model, loader, preprocess)

    train_features, train_labels = (t.to(device) for t in features(train))  # the probe trains where they are
    test_features, test_labels = (t.to(device) for t in features(test))
    print(f"Features of {len(train_labels)} training and {len(test_labels)} test images; training the probe.")
    metrics = probe(train_features, train_labels, test_features, test_labels, lr=args.lr, epochs=args.epochs,
                    batch_size=args.batch_size, seed=args.seed, normalize=not args.no_normalize,
                    fewshot_k=args.fewshot_k, val_proportion=args.val_proportion, progress=print)
    print(f"Linear probe on {len(test_labels)} test images: top-1 {metrics['lp_acc1']:.4f}, top-5 "
          f"{metrics['lp_acc5']:.4f}, mean per-class recall {metrics['lp_mean_per_class_recall']:.4f} (weight decay "
          f"{metrics['weight_decay']:g})")
    benchmark = test.shards.benchmark if args.shards else None
    record = results.result("linear_probe", dataset_name(args, args.shards or args.images, benchmark),
                            metrics=metrics, **provenance(model.architecture.name, args.pretrained, args.checkpoint),
                            num_images=len(test_labels), num_train_images=len(train_labels))
    write_result(args, record)
    return 0
