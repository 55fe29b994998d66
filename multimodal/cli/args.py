"""Options shared by several commands, and the checks they need before any heavy import.

Nothing here imports torch, Lightning or open_clip: `multimodal CMD --help` and mistakes found in
the arguments alone answer in a fraction of a second.
"""

import argparse
from pathlib import Path

from multimodal.errors import UserError
from multimodal.paths import check_checkpoint, check_output


def add_checkpoint_args(parser: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    """The weights to load: --checkpoint FILE, or published ones by name (--model with --pretrained, or an
    hf-hub: --model); `check_weights` checks them, `load_model` loads them."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=help or "this project's Lightning .ckpt, or an open_clip state dict "
                                     "(.pt/.bin/.safetensors)")
    parser.add_argument("--model", default=None,
                        help="architecture: ViT-B-32, tiny, a JSON path, or hf-hub:ORG/REPO (with its weights); "
                             "overrides the one a .ckpt names")
    parser.add_argument("--pretrained", default=None,
                        help="published weights of --model instead of --checkpoint: an open_clip pretrained tag "
                             "(laion2b_s34b_b79k; `multimodal models` lists them) or a local weights file")
    parser.add_argument("--cache_dir", type=Path, default=None,
                        help="where downloaded weights are kept (default: the Hugging Face cache, $HF_HOME/hub)")
    parser.set_defaults(weights_required=required)


def check_weights(args: argparse.Namespace) -> None:
    """One source of weights, named the way `add_checkpoint_args` allows; local files exist."""
    from multimodal.pretrained import is_file, is_hub

    if args.checkpoint is not None and args.pretrained is not None:
        raise UserError("Pass --checkpoint or --pretrained, not both.")
    if args.checkpoint is not None:
        check_checkpoint(args.checkpoint)
    elif args.pretrained is not None:
        if args.model is None:
            raise UserError(f"--pretrained {args.pretrained} needs --model, the architecture it is for.")
        if is_file(args.pretrained):
            check_checkpoint(args.pretrained)
    elif args.weights_required and not (args.model and is_hub(args.model)):
        raise UserError("Pass --checkpoint FILE, or --model NAME --pretrained TAG, or --model hf-hub:ORG/REPO.")


def weights_given(args: argparse.Namespace) -> bool:
    """Whether `args` name any weights (a checkpoint, a pretrained tag or file, an hf-hub model)."""
    from multimodal.pretrained import is_hub

    return args.checkpoint is not None or args.pretrained is not None or bool(args.model and is_hub(args.model))


def load_model(args: argparse.Namespace):
    """The model `args` name (`check_weights` first): `multimodal.weights.load_model`."""
    from multimodal import weights

    return weights.load_model(args.checkpoint, args.model, pretrained=args.pretrained, cache_dir=args.cache_dir,
                              setting="--{}")


def add_decode_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu"),
                        help="where JPEGs are decoded: gpu (the batch together, where the model runs: nvJPEG on "
                             "CUDA), cpu (the loader workers), auto: gpu on a GPU")


def add_shard_args(parser: argparse.ArgumentParser, what: str, labels: bool = False) -> None:
    """--shards (clip_benchmark's --dataset_root too) and how their samples read (`labels`: their class too)."""
    parser.add_argument("--shards", "--dataset_root", dest="shards",
                        help=f"{what}: our shards, img2dataset's output, or a CLIP_benchmark webdataset dataset's "
                             "folder "
                             "(ROOT with ROOT/SPLIT/nshards.txt); a folder, a brace pattern, a glob, or several joined "
                             "by '::'")
    parser.add_argument("--split", default=None,
                        help="the split of a CLIP_benchmark dataset folder (default: test, or the split folder named)")
    parser.add_argument("--image_key", default=None,
                        help="the member holding the image (default: the first of jpg, jpeg, png, webp)")
    if labels:
        parser.add_argument("--label_key", default="cls", help="the member holding the class index")
    else:
        parser.add_argument("--text_key", default=None,
                            help="the member holding the caption (default: json 'captions', else txt)")
        parser.add_argument("--caption_field", nargs="+", default=None,
                            help="json field(s) holding captions, e.g. caption_blip (a string or a list each)")


def shard_source(args: argparse.Namespace, labels: bool = False):
    """The `ShardSource` of `add_shard_args`'s options (imports the data layer)."""
    from multimodal.data.decode import Members
    from multimodal.data.formats import check_members
    from multimodal.data.sources import LabelledShardSource, ShardSource

    if labels:
        members = Members.chosen(args.image_key, label_key=args.label_key, setting="--{}")
        source = LabelledShardSource(args.shards, members, args.split)
    else:
        members = Members.chosen(args.image_key, args.text_key, args.caption_field, setting="--{}")
        source = ShardSource(args.shards, members, args.split)
    benchmark, task = source.shards.benchmark, "classification" if labels else "retrieval"
    if benchmark is not None and benchmark.task != task:
        other = {"retrieval": "eval retrieval", "classification": "eval zeroshot"}[benchmark.task]
        raise UserError(f"{args.shards} is a CLIP_benchmark {benchmark.task} dataset: evaluate it with "
                        f"`multimodal {other}`.")
    check_members(source.shards, captions=not labels, label=labels, setting="--{}")
    return source


def add_preprocess_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preprocess", default="fast", choices=("fast", "open_clip"),
                        help="fast: JPEGs decoded at the smallest DCT scale the crop needs and resized by torch "
                             "(within a stated tolerance of open_clip's figures); open_clip: PIL decoding and "
                             "open_clip's own eval transform, for figures equal to CLIP_benchmark's")


def preprocess_of(args: argparse.Namespace, model):
    """The eval transform that --preprocess names, for `model`'s architecture."""
    from multimodal.data.pixels import EvalTransform, OpenClipEvalTransform

    transform = OpenClipEvalTransform if args.preprocess == "open_clip" else EvalTransform.of
    return transform(model.architecture.preprocessing)


def check_preprocess(args: argparse.Namespace) -> None:
    if args.preprocess == "open_clip" and args.decode == "gpu":
        raise UserError("--preprocess open_clip decodes images with PIL, as open_clip does: drop --decode gpu.")


SEED_MAX = 2**32 - 1  # the seeds numpy and Lightning take


def check_seed(args: argparse.Namespace) -> None:
    """--seed within 0 to 2**32 - 1, the range every random generator the commands seed takes."""
    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed {args.seed} is outside 0 to {SEED_MAX} (2**32 - 1), the seeds numpy and Lightning "
                        "take: give one in that range, such as 0.")


def check_counts(args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
                 ) -> None:
    """The named integer options of `args` are at least 1 (`positive`) or at least 0 (`non_negative`)."""
    for names, least in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(args, name)
            if value < least:
                raise UserError(f"--{name} must be {'a positive integer' if least else '0 or more'}, got {value}.")


def add_result_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None,
                        help="the dataset's name in the result, as CLIP_benchmark names it (mscoco_captions, "
                             "flickr30k, imagenet1k; default: the --preset, else the data folder's name)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the result here as JSON, in CLIP_benchmark's layout (dataset, model, pretrained, "
                             "task, metrics)")
    parser.add_argument("--out_table", type=Path, default=None,
                        help="append the result as one row of this CSV table (created if absent): a sweep over "
                             "checkpoints becomes one table")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out file that is not an evaluation result, and start afresh an "
                             "--out_table that cannot be read back exactly as a table (a column named twice, "
                             "ragged rows); without it both are left as they are and the command stops")


def check_result_args(args: argparse.Namespace) -> None:
    """The outputs of `add_result_args`, checked before any work: where a file cannot be written, or holds what
    writing the result would lose (`eval.results.check_result_file`, `read_table`)."""
    from multimodal.eval import results

    if args.out is not None:
        check_output(args.out, "--out", "file", (".json",))
        results.check_result_file(args.out, args.overwrite, setting="--{}")
    if args.out_table is not None:
        check_output(args.out_table, "--out_table", "file", (".csv",))
        results.read_table(args.out_table, args.overwrite, setting="--{}")


def write_result(args: argparse.Namespace, record: dict) -> None:
    """Write a result (`eval.results.result`) as JSON to --out and append it as a row of the CSV --out_table
    (either may be absent), checked again as `check_result_args` checked them before the work."""
    from multimodal.eval.results import append_row, check_result_file
    from multimodal.files import write_json
    from multimodal.userfiles import writing

    if args.out is not None:
        check_result_file(args.out, args.overwrite, setting="--{}")
        with writing(args.out):
            write_json(args.out, record, indent=2)
        print(f"Wrote {args.out}")
    if args.out_table is not None:
        append_row(args.out_table, record, args.overwrite, setting="--{}")
        print(f"Appended a row to {args.out_table}")


def dataset_name(args: argparse.Namespace, data: str | Path, benchmark=None) -> str:
    """--dataset, else a CLIP_benchmark dataset's name as CLIP_benchmark writes it (wds/mscoco_captions), else
    the name of the folder that `data` (a folder, a file or a shard pattern) is in."""
    if args.dataset:
        return args.dataset
    if benchmark is not None:  # formats.Benchmark
        return benchmark.name
    path = Path(str(data).rstrip("/"))
    return path.name if path.is_dir() else path.parent.name or path.stem


def provenance(model: str, pretrained: str | None, checkpoint: str | Path | None) -> dict:
    """The result fields that say which weights were evaluated: model, pretrained (the tag, or the local
    file as CLIP_benchmark writes it), and for a training checkpoint its step and epoch."""
    from multimodal import weights

    fields = {"model": model, "pretrained": pretrained or (str(checkpoint) if checkpoint else None),
              "checkpoint": str(checkpoint) if checkpoint else None}
    return {**fields, **weights.progress(checkpoint)} if checkpoint else fields
