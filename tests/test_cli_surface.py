"""The command line as users script it, frozen (as torchtitan freezes its config surface): commands,
options and defaults. A change here breaks someone's job script, so it is a deliberate edit of this
file, in the same commit as the change and its note in the docs."""

import argparse
import inspect

from multimodal.cli import COMMANDS, caption, embed, evaluate, probe, serve, shards, tools

SHARDS_OPTIONS = {"--images": None, "--out": None, "--shard_size": 1000, "--max_side": None, "--num_workers": 4,
                  "--overwrite": False}
WEIGHTS = {"--checkpoint": None, "--model": None, "--pretrained": None, "--cache_dir": None}
RESULT = {"--dataset": None, "--out": None, "--out_table": None, "--overwrite": False}
SHARD_MEMBERS = {"--split": None, "--image_key": None, "--text_key": None, "--caption_field": None}
LABELLED = {"--split": None, "--image_key": None, "--label_key": "cls"}
DECODING = {"--strategy": "beam", "--top_k": 50, "--top_p": 0.9, "--temperature": 1.0, "--beams": 4,
            "--length_penalty": 1.0, "--max_length": 30, "--seed": 0, "--batch_size": 32, "--num_workers": 4,
            "--decode": "auto"}
SURFACE = {
    "export": {**WEIGHTS, "--out": None, "--overwrite": False},
    "embed": {**WEIGHTS, "--shards": None, **SHARD_MEMBERS, "--images": None, "--texts": None,
              "--out": None, "--parts": None, "--batch_size": 256, "--dtype": "float16", "--part_size": 10000,
              "--num_workers": 4, "--accelerator": "auto", "--devices": 1, "--decode": "auto", "--preprocess": "fast",
              "--overwrite": False},
    "eval retrieval": {**WEIGHTS, "--shards": None, **SHARD_MEMBERS, "--embeddings": None,
                       "--ks": [1, 5, 10], "--batch_size": 256, "--num_workers": 4, "--chunk_size": 4096,
                       "--decode": "auto", "--preprocess": "fast", **RESULT},
    "eval zeroshot": {**WEIGHTS, "--preset": None, "--classnames": None,
                      "--templates": None, "--shards": None, **LABELLED, "--images": None, "--batch_size": 128,
                      "--num_workers": 4, "--decode": "auto", "--preprocess": "fast", **RESULT},
    "eval linear_probe": {**WEIGHTS, "--shards": None, **LABELLED, "--train_split": "train", "--train_shards": None,
                          "--images": None, "--train_images": None, "--val_proportion": None, "--fewshot_k": -1,
                          "--lr": 0.1, "--epochs": 10, "--seed": 0, "--no_normalize": False, "--batch_size": 64,
                          "--num_workers": 4, "--decode": "auto", "--preprocess": "fast", **RESULT},
    "search": {"--index": None, "--text": None, "--image": None, "--target": None, "--k": 8, "--grid": None,
               **WEIGHTS},
    "index": {"embeddings": None, "--out": None, "--max_index_memory": "4GB", "--kind": None, "--parts": None,
              "--merge": None},
    "plot": {"run": None, "--out": None},
    "caption": {**WEIGHTS, "--images": None, "--shards": None, "--out": None, "--grid": None, "--part_size": 1000,
                "--overwrite": False, **DECODING},
    "eval captioning": {**WEIGHTS, "--shards": None, "--captions": None, **DECODING, **RESULT},
    "models": {"names": None, "--pretrained_only": False},
    "serve": {"--index": None, **WEIGHTS, "--host": "127.0.0.1", "--port": 8000, "--token": None, "--max_upload_mb": 16,
              "--max_batch": 64},
    "shards": {"coco": {"--captions": None, **SHARDS_OPTIONS}, "csv": {"--csv": None, **SHARDS_OPTIONS},
               "karpathy": {"--json": None, "--split": ["test"], **SHARDS_OPTIONS}},
}
TRAIN_MODEL = {  # `multimodal train --model.NAME`
    "model_name": "tiny", "lr": 5e-4, "weight_decay": 0.2, "betas": (0.9, 0.98), "eps": 1e-6, "warmup_steps": 100,
    "min_lr_ratio": 0.0, "val_loss_batch_size": 256, "loss": "clip",
    "caption_loss_weight": 2.0, "micro_batches": 1, "pretrained": None,
    "cache_dir": None,
    "lock_image": False, "lock_image_unlocked_groups": 0, "lock_text": False, "lock_text_unlocked_layers": 0,
    "grad_checkpointing": False, "patch_dropout": 0.0, "compile": False, "count_flops": True, "peak_tflops": None,
    "max_nonfinite_steps": 5,
}
TRAIN_DATA = {  # `multimodal train --data.NAME`
    "train_shards": inspect.Parameter.empty, "val_shards": None, "model_name": "tiny", "pretrained": None,
    "cache_dir": None, "batch_size": 256,
    "num_workers": 4, "shuffle_buffer": 2000, "resampled": False, "num_samples": None, "train_weights": None,
    "upsampling_factors": None, "image_key": None, "text_key": None, "caption_field": None, "seed": 0,
    "synthetic": None,
    "max_bad_fraction": 0.1, "max_image_pixels": 89478485, "decode": "auto",
}
TRAIN_FLAGS = {"--resume", "--overwrite"}


def options(parser: argparse.ArgumentParser) -> dict:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update({name: options(sub) for name, sub in action.choices.items()})
        elif not isinstance(action, argparse._HelpAction):
            out[action.option_strings[0] if action.option_strings else action.dest] = action.default
    return out


def test_the_commands_and_their_options_and_defaults():
    assert sorted(COMMANDS) == ["caption", "demo", "embed", "eval", "export", "index", "models", "plot", "search",
                                "serve", "shards", "train"]
    assert {
        "export": options(evaluate.export_parser()), "embed": options(embed.embed_parser()),
        "eval retrieval": options(evaluate.eval_retrieval_parser()),
        "eval zeroshot": options(evaluate.eval_zeroshot_parser()),
        "eval linear_probe": options(probe.linear_probe_parser()),
        "search": options(tools.search_parser()), "index": options(tools.index_parser()),
        "plot": options(tools.plot_parser()),
        "models": options(tools.models_parser()), "serve": options(serve.serve_parser()),
        "caption": options(caption.caption_parser()), "eval captioning": options(caption.eval_captioning_parser()),
        "shards": options(shards.shards_parser()),
    } == SURFACE


def test_the_training_options_and_defaults():
    from multimodal.data.datamodule import ShardDataModule
    from multimodal.recipe import build_module

    def defaults(build) -> dict:
        return {k: p.default for k, p in inspect.signature(build).parameters.items()}

    assert defaults(build_module) == TRAIN_MODEL
    assert defaults(ShardDataModule) == TRAIN_DATA
    from multimodal.cli.train import TrainCLI

    added = []
    TrainCLI.add_arguments_to_parser(None, type("P", (), {"add_argument": lambda self, f, **k: added.append(f),
                                                          "link_arguments": lambda self, *a, **k: None})())
    assert set(added) == TRAIN_FLAGS


def test_one_option_style_and_kebab_spellings_read_as_it():
    """Every option is snake_case, as LightningCLI spells `train`'s; `--batch-size` still works (job
    scripts written for open_clip's style), and values are never rewritten."""
    from multimodal.cli import snake_case_options

    def names(tree) -> set[str]:
        return {k for key, value in tree.items() for k in ([key] if not isinstance(value, dict) else names(value))}

    assert not [name for name in names(SURFACE) | TRAIN_FLAGS if "-" in name.removeprefix("--")]
    given = ["embed", "--batch-size", "8", "--trainer.max-steps=5", "--out", "my-dir", "--text", "a well-lit room",
             "-h", "--"]
    assert snake_case_options(given) == ["embed", "--batch_size", "8", "--trainer.max_steps=5", "--out", "my-dir",
                                         "--text", "a well-lit room", "-h", "--"]
    kebab = ["--checkpoint", "m.pt", "--texts", "t.txt", "--out", "o", "--num-workers", "0", "--part-size", "7"]
    args = embed.embed_parser().parse_args(snake_case_options(kebab))
    assert (args.num_workers, args.part_size) == (0, 7)
