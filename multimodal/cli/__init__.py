"""The `multimodal` command: argument wiring, nothing else.

    multimodal train --config configs/debug.yaml [--section.key value ...]
    multimodal shards coco --captions captions_train2017.json --images train2017/ --out DIR
    multimodal shards csv --csv captions.txt --images images/ --out DIR
    multimodal demo [--section.key value ...]

Mistakes in the input end with one sentence on stderr and exit status 2; `--debug` shows the
traceback instead.
"""

import sys

from multimodal.cli.evaluate import export
from multimodal.cli.shards import write_shards
from multimodal.cli.train import run_demo, train
from multimodal.errors import UserError

COMMANDS = {"train": train, "shards": write_shards, "demo": run_demo, "export": export}
USAGE = """usage: multimodal {train,shards,demo} ... [--debug]

  train    train a CLIP model:  multimodal train --config configs/debug.yaml [--section.key value ...]
  shards   write shards:        multimodal shards {coco,csv} --images DIR --out DIR ...
  demo     synthetic data, training and retrieval report in a few CPU minutes

Add --help after a command for its options; --debug shows tracebacks of input errors."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
