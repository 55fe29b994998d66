"""Hostile and careless input to `multimodal train` and `demo` (issue 22): configs built to eat memory or
hang (YAML alias bombs, sparse giants, named pipes) are refused before they are read or expanded; odd but
parseable settings are one sentence; help and a misspelled command answer without the heavy libraries;
a run stopped by its input before training leaves no run folder behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, limit_memory

DEBUG = str(REPO / "configs" / "debug.yaml")
TINY_RUN = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--data.synthetic.train_samples", "32", "--data.synthetic.val_samples", "0", "--data.val_shards", "null",
            "--data.synthetic.shard_size", "32", "--data.batch_size", "8", "--data.num_workers", "0"]


def alias_bomb(levels: int = 10) -> str:
    """A "billion laughs": each anchor a list of nine aliases of the one before (9^10 strings, ~900 bytes)."""
    lines = ['- &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"- &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def hostile_configs(folder: Path) -> dict[str, tuple[list[str], str]]:
    """Each way a config reaches `train`, each carrying something that would eat memory or hang."""
    folder.mkdir()
    bomb = alias_bomb()
    (folder / "bomb.yaml").write_text(f"seed_everything: 0\nlaughs:\n{bomb.replace('- ', '  - ')}")
    (folder / "data-bomb.yaml").write_text(f"train_shards: x\ncaption_field:\n{bomb.replace('- ', '  - ')}")
    (folder / "trainer-bomb.yaml").write_text(f"max_steps: 1\ncallbacks:\n{bomb.replace('- ', '  - ')}")
    (folder / "nests-a-bomb.yaml").write_text("data: data-bomb.yaml\n")  # a config naming another
    (folder / "loop.yaml").write_text("trainer:\n  callbacks: &loop [*loop]\n")  # an alias inside its anchor
    (folder / "deep.yaml").write_text("data:\n  caption_field: " + "[" * 500 + "]" * 500 + "\n")  # Python: 1000
    (folder / "names-a-pipe.yaml").write_text("data: pipe.yaml\n")
    (folder / "huge.yaml").touch()
    os.truncate(folder / "huge.yaml", 20 << 30)  # sparse: no disk, 20 GB to read
    os.mkfifo(folder / "pipe.yaml")  # nobody writes: a read never returns
    inline = "[" + ", ".join(line[2:] for line in bomb.splitlines()) + "]"
    return {  # case: (the arguments, the file or option the sentence names)
        "bomb": (["--config", "bomb.yaml"], "bomb.yaml"),
        "a section's file": (["--config", DEBUG, "--data", "data-bomb.yaml"], "data-bomb.yaml"),
        "the trainer's file": (["--config", DEBUG, "--trainer", "trainer-bomb.yaml"], "trainer-bomb.yaml"),
        "a file a config names": (["--config", DEBUG, "--config", "nests-a-bomb.yaml"], "data-bomb.yaml"),
        "a loop": (["--config", DEBUG, "--config", "loop.yaml"], "loop.yaml"),
        "deep nesting": (["--config", DEBUG, "--config", "deep.yaml"], "deep.yaml"),
        "sparse 20 GB": (["--config", "huge.yaml"], "huge.yaml"),
        "named pipe": (["--config", "pipe.yaml"], "pipe.yaml"),
        "a pipe a config names": (["--config", DEBUG, "--config", "names-a-pipe.yaml"], "pipe.yaml"),
        "a value": (["--config", DEBUG, "--data.caption_field", inline], "--data.caption_field"),
    }


HELP_CALLS = (["train", "--help"], ["demo", "-h"], ["train", "--config", "x.yaml", "--help"])


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> dict:
    """What one new process, its heap capped at 4 GB, did (a process of its own: nothing imported before it,
    and a config that ate memory would kill it, not the tests): the help of HELP_CALLS and the heavy libraries
    imported by then; the parser's own help, built next; `train` on each of `hostile_configs`."""
    folder = tmp_path_factory.mktemp("hostile") / "cfg"
    cases = hostile_configs(folder)
    script = (
        "import contextlib, io, json, sys\n"
        "from multimodal.cli import main\n"
        "def run(args):\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        code = main(args)\n"
        "    return [code, out.getvalue(), err.getvalue()]\n"
        f"help = {{' '.join(args): run(args) for args in {HELP_CALLS!r}}}\n"
        "heavy = ('torch', 'pytorch_lightning', 'lightning', 'open_clip', 'jsonargparse', 'numpy', 'PIL')\n"
        "imported = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "from multimodal.cli.train import parser_help\n"
        "parsers = parser_help()  # before anything else defines classes its lists would name\n"
        f"configs = {{case: run(['train', *args]) for case, (args, _) in {cases!r}.items()}}\n"
        "print(json.dumps({'help': help, 'imported': imported, 'parser_help': parsers, 'configs': configs}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, preexec_fn=limit_memory)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "cases": cases, "folder": folder}


def test_configs_that_would_eat_memory_or_hang_are_one_sentence(fresh_process):
    """A 900-byte alias bomb given as `--config` was killed at 4 GB: every way a config reaches `train` (the
    config, a section's file, a file a config names, a value on the command line) is refused before it is
    expanded or read, in one sentence naming it."""
    result, cases = fresh_process["configs"], fresh_process["cases"]
    for case, (code, _, stderr) in result.items():
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and cases[case][1] in lines[0], \
            (case, stderr)
    assert "expands through its YAML aliases" in result["a file a config names"][2]
    assert "an alias inside the anchor it refers to" in result["a loop"][2]
    assert "over the limit" in result["sparse 20 GB"][2] and "MULTIMODAL_MAX_CONFIG_BYTES" in result["sparse 20 GB"][2]
    assert all("not a regular file" in result[case][2] for case in ("named pipe", "a pipe a config names"))
    assert "more than 100 levels deep" in result["deep nesting"][2]
    assert not (fresh_process["folder"] / "runs").exists()


def test_a_config_over_a_raised_limit_is_read_and_aliases_are_not_refused(cli, tmp_path):
    """The limits are the user's to raise: a config of many values is refused over the byte limit it is
    given, then read as usual under a higher one; a config's ordinary aliases are read as they were."""
    config = tmp_path / "many.yaml"
    config.write_text("data:\n  caption_field: [" + ", ".join(f"c{i}" for i in range(2000)) + "]\n")
    size = config.stat().st_size
    refused = f"error: {config} is {size} bytes, over the limit of {size - 1} bytes for a config (set " \
              "MULTIMODAL_MAX_CONFIG_BYTES to raise it)."
    parsed = "error: model.lr must be positive, got -1.0."  # refused after the whole config was read
    for limit, expected in ((size - 1, refused), (size, parsed)):
        done = cli("train", "--config", DEBUG, "--config", str(config), "--model.lr", "-1", cwd=tmp_path,
                   env={"MULTIMODAL_MAX_CONFIG_BYTES": str(limit)})
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [expected]
    (tmp_path / "aliases.yaml").write_text(
        "trainer:\n  logger:\n"
        "    - {class_path: pytorch_lightning.loggers.TensorBoardLogger, init_args: &at {save_dir: runs, name: a}}\n"
        "    - {class_path: pytorch_lightning.loggers.CSVLogger, init_args: *at}\n")
    done = cli("train", "--config", DEBUG, "--config", "aliases.yaml", "--model.lr", "-1", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [parsed]


ODD_SETTINGS = {  # (the settings, what the one sentence says)
    "negative shuffle buffer": (["--data.shuffle_buffer", "-5"], "data.shuffle_buffer must be 0 or more, got -5"),
    "64-bit weights": (["--trainer.precision", "64-true"],
                       "trainer.precision must be 32-true, bf16-mixed or 16-mixed (or null: bf16-mixed on a GPU that "
                       "has it, else 32-true), got 64-true."),
    "half weights": (["--trainer.precision", "bf16-true"], "trainer.precision must be 32-true, bf16-mixed or 16-mixed"),
    "seed past 2^32": (["--seed_everything", "100000000000000000000000"],
                       "seed_everything must be true, false or a whole number from 0 to 4294967295, got 1000000"),
    "negative seed": (["--seed_everything", "-1"], "seed_everything must be true, false or a whole number"),
    "max_steps -2": (["--trainer.max_steps", "-2"], "trainer.max_steps must be -1 (no limit) or 1 or more, got -2"),
    "max_steps 0": (["--trainer.max_steps", "0"], "trainer.max_steps must be -1 (no limit) or 1 or more, got 0"),
    "no end": (["--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"],
               "trainer.max_steps and trainer.max_epochs are both -1 (no end)"),
    "no training batch": (["--trainer.limit_train_batches", "0"], "trainer.limit_train_batches must be a fraction"),
    "no gradient accumulation at all": (["--trainer.accumulate_grad_batches", "0"],
                                        "trainer.accumulate_grad_batches must be 1 or more, got 0"),
    "negative clipping": (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val must be 0 or more"),
    "infinite learning rate": (["--model.lr", ".inf"], "model.lr must be a finite number, got inf"),
    "nan learning rate": (["--model.lr", ".nan"], "model.lr must be a finite number, got nan"),
    "warmup -1": (["--model.warmup_steps", "-1"], "model.warmup_steps must be 0 or more, got -1"),
    "no validation batch": (["--model.val_loss_batch_size", "0"], "model.val_loss_batch_size must be 1 or more"),
    "negative caption weight": (["--model.caption_loss_weight", "-2"], "model.caption_loss_weight must be 0 or more"),
    "more micro-batches than samples": (["--model.micro_batches", "16"],
                                        "model.micro_batches 16 cannot cut data.batch_size 8 into 16 chunks"),
    "batch size 0": (["--data.batch_size", "0"], "data.batch_size must be 1 or more, got 0"),
    "workers -1": (["--data.num_workers", "-1"], "data.num_workers must be 0 or more, got -1"),
    "no image allowed": (["--data.max_image_pixels", "0"], "data.max_image_pixels must be 1 or more"),
    "synthetic scenes of 10^5 pixels a side": (["--data.synthetic.image_size", "100000"],
                                               "data.synthetic.image_size must be from 16 to 4096, got 100000"),
    "empty synthetic shards": (["--data.synthetic.shard_size", "0"], "data.synthetic.shard_size must be 1 or more"),
}


@pytest.mark.parametrize("case", ODD_SETTINGS)
def test_odd_settings_are_one_sentence(cli, tmp_path, case):
    """Refused in one sentence, before any work (no data written, no run folder): `--data.shuffle_buffer -5`
    was accepted, `--trainer.precision 64-true` a traceback at the first step, `--seed_everything 10^23`
    blamed the machine."""
    settings, expected = ODD_SETTINGS[case]
    done = cli("train", "--config", DEBUG, *TINY_RUN, *settings, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_train_help_is_the_parsers_own_without_torch(fresh_process):
    """`multimodal train --help` printed Lightning's parser's help after importing torch, Lightning and
    open_clip (about 7 s): now the same text, prepared, with none of them imported. The parser's own is
    built in the same fresh process: its lists of classes name those defined at the time."""
    assert fresh_process["imported"] == []
    parsers = fresh_process["parser_help"]
    assert "--data.shuffle_buffer" in parsers and "--resume" in parsers
    for args, (code, text, _) in fresh_process["help"].items():
        assert code == 0 and text == parsers, (args, "regenerate multimodal/cli/train_help.py: python -c "
                                                     "'from multimodal.cli.train import write_help; write_help()'")


def test_a_misspelled_command_names_the_nearest_one(cli, tmp_path):
    """One sentence naming the nearest command, not the whole usage (or, with none near, every command)."""
    done = cli("trian", "--config", DEBUG, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "error: unknown command 'trian' (did you mean 'train'?): use one of train, " \
                                  "shards, demo, export, embed, eval, index, search, plot, models, caption, serve."
    done = cli("xyzzy", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: unknown command 'xyzzy': use one of train, shards, demo, export, embed, eval, index, search, plot, "
        "models, caption, serve.")


def test_a_run_stopped_by_its_input_leaves_no_run_folder(cli, tmp_path):
    """Shards whose number of samples is unknown are found after the run has claimed runs/debug/version_0 and
    written its config there: the folder goes, and the next good run takes version_0."""
    from multimodal.data.shards import write_synthetic

    write_synthetic(tmp_path / "shards", num_samples=16, shard_size=16)
    (tmp_path / "shards" / "sizes.json").unlink()
    run = ["train", "--config", DEBUG, *TINY_RUN, "--data.synthetic", "null", "--data.train_shards", "shards"]
    done = cli(*run, cwd=tmp_path)
    assert done.returncode == 2 and "set data.num_samples" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not list((tmp_path / "runs" / "debug").glob("version_*"))
    done = cli(*run, "--data.num_samples", "16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in (tmp_path / "runs" / "debug").glob("version_*")] == ["version_0"]
    assert (tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt").is_file()
