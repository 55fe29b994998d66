"""The `multimodal` command: argument wiring, nothing else.

    multimodal train --config configs/debug.yaml [--section.key value ...]
    multimodal shards coco --captions captions_train2017.json --images train2017/ --out DIR
    multimodal shards csv --csv captions.txt --images images/ --out DIR
    multimodal shards karpathy --json dataset_coco.json --images DIR [--split test ...] --out DIR
    multimodal demo [--section.key value ...]
    multimodal export --checkpoint last.ckpt --out model.safetensors
    multimodal embed --checkpoint last.ckpt --shards DIR --out EMB_DIR
    multimodal embed --model ViT-B-32 --pretrained laion2b_s34b_b79k --shards DIR --out EMB_DIR
    multimodal eval retrieval (--checkpoint last.ckpt --shards DIR | --embeddings EMB_DIR)
    multimodal eval zeroshot --checkpoint last.ckpt --classnames FILE (--shards DIR | --images DIR)
    multimodal caption --checkpoint coca.ckpt (--images DIR | --shards S) --out captions.jsonl [--strategy beam]
    multimodal eval captioning --checkpoint coca.ckpt --shards DIR
    multimodal index EMB_DIR --out INDEX [--max_index_memory 4GB] [--kind image|text] [--parts START:END]
    multimodal index --merge INDEX_A INDEX_B --out INDEX
    multimodal search --index EMB_DIR|INDEX (--text "a dog on a skateboard" | --image PATH) [--k 8] [--grid out.png]
    multimodal serve --index EMB_DIR|INDEX [--port 8000] [--token TOKEN]
    multimodal plot RUN_DIR [--out curves.png]
    multimodal models [NAME ...]

Options have one style, snake_case as LightningCLI spells `train`'s (`--data.num_workers`,
`--batch_size`); the kebab spelling of a name (`--batch-size`) is read as the same option.
Mistakes in the input end with one sentence on stderr and exit status 2; `--debug` shows the
traceback instead. What the library reports through `logging` (the `multimodal` loggers: skipped
images, bad data) appears on stderr, one line a record, as the command runs.
"""

import difflib
import importlib
import logging
import sys

from multimodal.errors import UserError, message

# command -> (module, function): a command's module is imported when it runs, so that `--help` and
# the commands that need no model never import torch, Lightning or open_clip.
COMMANDS = {"train": ("train", "train"), "shards": ("shards", "write_shards"), "demo": ("train", "run_demo"),
            "export": ("evaluate", "export"), "embed": ("embed", "embed"), "eval": ("evaluate", "evaluate"),
            "index": ("tools", "index"), "search": ("tools", "search"), "plot": ("tools", "plot"),
            "models": ("tools", "models"), "caption": ("caption", "caption"),
            "serve": ("serve", "serve")}
USAGE = """usage: multimodal {train,shards,demo,export,embed,eval,caption,index,search,serve,plot,models} ... [--debug]

  train    train a CLIP model:  multimodal train --config configs/debug.yaml [--section.key value ...]
  shards   write shards:        multimodal shards {coco,csv,karpathy} --images DIR --out DIR ...
  demo     synthetic data, training and retrieval report in a few CPU minutes
  export   open_clip weights:   multimodal export --checkpoint last.ckpt --out model.safetensors
  embed    embeddings in parts: multimodal embed --checkpoint CKPT (--shards S | --images DIR | --texts F) --out DIR
  eval     zero-shot metrics:   multimodal eval retrieval ... | multimodal eval zeroshot ... | eval captioning
  caption  captions (CoCa):     multimodal caption --checkpoint CKPT --images DIR --out captions.jsonl
  index    ANN index (faiss):   multimodal index EMB_DIR --out INDEX [--max_index_memory 4GB] | --merge A B --out I
  search   nearest neighbours:  multimodal search --index EMB_DIR|INDEX --text "a dog" [--k 8] [--grid out.png]
  serve    search page and API: multimodal serve --index EMB_DIR|INDEX [--port 8000] [--token TOKEN]
  plot     training curves:     multimodal plot runs/demo/version_0
  models   architectures and pretrained tags: multimodal models [ViT-B-32 siglip ...]

Add --help after a command for its options; --debug shows tracebacks of input errors."""


class _Stderr(logging.StreamHandler):
    """Records as their bare message, on whatever `sys.stderr` is when each is written."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the stream is always the current stderr
        pass


def log_to_stderr() -> None:
    """In the command-line program (`main`): the `multimodal` loggers' records of INFO and above on stderr,
    once per process, and not passed on to the root logger, whose handler open_clip installs by calling
    `logging.info` (Python's implicit basicConfig), which printed every line twice. Used as a library,
    without `main`, the records go to whatever logging the caller set up."""
    logger = logging.getLogger("multimodal")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def snake_case_options(argv: list[str]) -> list[str]:
    """`--batch-size 8` and `--trainer.max-steps=5` as `--batch_size 8` and `--trainer.max_steps=5`:
    option names only, never their values."""
    def one(arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        name, eq, value = arg.partition("=")
        return "--" + name[2:].replace("-", "_") + eq + value
    return [one(a) for a in argv]


def nearest(name: str, choices) -> str:
    """' (did you mean X?)' for the choice nearest to a misspelled `name`, else ''."""
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def unknown_command(name: str) -> str:
    """The sentence for a command that does not exist: the nearest one, and all of them."""
    return f"unknown command '{name}'{nearest(name, COMMANDS)}: use one of {', '.join(COMMANDS)}."


def main(argv: list[str] | None = None) -> int:
    argv = snake_case_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: {unknown_command(argv[0])}", file=sys.stderr)
        return 2
    if argv[0] in ("train", "demo") and ("-h" in argv or "--help" in argv):
        from multimodal.cli.train_help import HELP  # Lightning's parser's own text, without building it

        print(HELP, end="")
        return 0
    module, function = COMMANDS[argv[0]]
    log_to_stderr()
    try:
        return getattr(importlib.import_module(f"multimodal.cli.{module}"), function)(argv[1:])
    except UserError as exc:
        if debug:
            raise
        print(f"error: {message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named that no check above caught: still one sentence
        if debug or not exc.filename:
            raise
        print(f"error: {exc.filename} cannot be used ({exc.strerror or exc}): check the path and its "
              "permissions.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
