"""The `multimodal` command end to end: debug.yaml training from shards, and bad input."""

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, run_cli

DEBUG = str(REPO / "configs" / "debug.yaml")


def test_debug_config_trains_from_synthetic_shards(cli, tmp_path):
    proc = cli("train", "--config", DEBUG, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "debug" / "version_0"
    assert (tmp_path / "runs" / "debug" / "data" / "train" / "sizes.json").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["model_name"] == "tiny" and config["trainer"]["max_steps"] == 6
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    for notice in ("litlogger", "No pretrained weights loaded"):  # nothing at start a user cannot act on
        assert notice not in proc.stderr + proc.stdout
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/logit_scale", "train/lr", "train/samples_per_second",
            "train/samples_per_second_per_device"} <= logged
    # A second run gets its own folder; the data is not written again.
    again = cli("train", "--config", DEBUG, "--trainer.max_steps", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "runs" / "debug" / "version_1" / "config.yaml").is_file()
    assert "synthetic train" not in again.stderr


def test_debug_config_on_real_coco_shards_in_bf16(cli, coco_mini, tmp_path):
    shards = tmp_path / "coco"
    proc = cli("shards", "coco", "--captions", str(coco_mini / "annotations" / "captions_val2017.json"),
               "--images", str(coco_mini / "val2017"), "--out", str(shards), "--shard_size", "40",
               "--max_side", "128", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Wrote 159 samples in 4 shards" in proc.stdout
    proc = cli("train", "--config", DEBUG, "--data.synthetic", "null", "--data.val_shards", "null",
               "--data.train_shards", f"{shards}/shard-{{000000..000003}}.tar", "--data.num_workers", "2",
               "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def export_over_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "model.safetensors").write_bytes(b"weights a user keeps")
    return ["export", "--checkpoint", DEBUG, "--out", str(tmp_path / "model.safetensors")]


def bad_coco(tmp_path: Path) -> list[str]:
    (tmp_path / "bad.json").write_text('{"images": []}')
    return ["shards", "coco", "--captions", str(tmp_path / "bad.json"), "--images", str(tmp_path), "--out",
            str(tmp_path / "out")]


def user_shard_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(b"\0" * 1024)
    (folder / "notes.txt").write_text("the user's own")
    return folder


BAD_INPUTS = {
    "missing shard": (lambda t: ["train", "--config", DEBUG, "--data.synthetic", "null",
                                 "--data.train_shards", f"{t}/shard-{{000000..000003}}.tar"], "does not exist"),
    "empty glob": (lambda t: ["train", "--config", DEBUG, "--data.synthetic", "null",
                              "--data.train_shards", f"{t}/*.tar"], "No shard matches"),
    "unknown model": (lambda t: ["train", "--config", DEBUG, "--model.model_name", "ViT-Q-99"],
                      "Unknown model 'ViT-Q-99'"),
    "zero batch size": (lambda t: ["train", "--config", DEBUG, "--data.batch_size", "0"],
                        "data.batch_size must be"),
    "negative batch size": (lambda t: ["train", "--config", DEBUG, "--data.batch_size", "-4"],
                            "data.batch_size must be"),
    "too few shards for the workers": (lambda t: ["train", "--config", DEBUG, "--data.num_workers", "8"],
                                       "4 shards cannot be split over 1 ranks x 8 workers"),
    "coco json without keys": (bad_coco, "lacks the COCO keys"),
    "export over an existing file": (export_over_a_file, "already exists: pass --overwrite"),
    "unknown config key": (lambda t: ["train", "--config", DEBUG, "--model.nope", "3"],
                           "unrecognized arguments: --model.nope"),
    "value of the wrong type": (lambda t: ["train", "--config", DEBUG, "--model.lr", "fast"],
                                "model.lr cannot be 'fast'"),
    "value out of range": (lambda t: ["train", "--config", DEBUG, "--data.max_bad_fraction", "1.5"],
                           "data.max_bad_fraction must be between 0 and 1"),
    "negative learning rate": (lambda t: ["train", "--config", DEBUG, "--model.lr", "-0.001"],
                               "model.lr must be positive, got -0.001"),
    "beta of 1.5": (lambda t: ["train", "--config", DEBUG, "--model.betas", "[1.5, 0.98]"],
                    "model.betas must both be in [0, 1)"),
    "negative weight decay": (lambda t: ["train", "--config", DEBUG, "--model.weight_decay", "-0.1"],
                              "model.weight_decay must be 0 or more"),
    "misspelled command": (lambda t: ["traain", "--config", DEBUG], "unknown command 'traain'"),
    "negative loader workers": (lambda t: ["eval", "retrieval", "--embeddings", str(t), "--num-workers", "-1"],
                                "--num_workers must be 0 or more, got -1"),
    "zero batch size for embed": (lambda t: ["embed", "--checkpoint", f"{t}/m.ckpt", "--texts", f"{t}/t.txt",
                                             "--out", f"{t}/e", "--batch-size", "0"],
                                  "--batch_size must be a positive integer, got 0"),
    "missing config file": (lambda t: ["train", "--config", f"{t}/nope.yaml"], "File does not exist"),
    "precision that does not exist": (lambda t: ["train", "--config", DEBUG, "--trainer.precision", "12-true"],
                                      "trainer.precision cannot be '12-true'"),
    "nothing to resume": (lambda t: ["train", "--config", DEBUG, "--resume", f"{t}/runs/debug/version_7"],
                          "Nothing to resume at"),
    "resume from a file that is not a checkpoint": (lambda t: ["train", "--config", DEBUG, "--resume", DEBUG],
                                                    "cannot be loaded safely as a checkpoint"),
    "missing pretrained weights": (lambda t: ["train", "--config", DEBUG, "--model.pretrained", f"{t}/w.pt"],
                                   "does not exist"),
    "missing captions file": (lambda t: ["shards", "coco", "--captions", f"{t}/nope.json", "--images", str(t),
                                         "--out", f"{t}/o"], "does not exist"),
    "csv without header": (lambda t: ["shards", "csv", "--csv", DEBUG, "--images", str(t),
                                      "--out", f"{t}/o"], "needs a header"),
    "synthetic data into a user's folder": (lambda t: ["train", "--config", DEBUG,
                                                       "--data.train_shards", str(user_shard_folder(t))],
                                            "holds files that are not this project's synthetic data"),
    "missing image folder": (lambda t: ["shards", "csv", "--csv", str(REPO / "tests" / "data" / "two.csv"),
                                        "--images", f"{t}/nope", "--out", f"{t}/o"], "Image folder"),
}


if not torch.cuda.is_available():
    BAD_INPUTS["gpu without a gpu"] = (lambda t: ["train", "--config", DEBUG, "--trainer.accelerator", "gpu"],
                                       "cannot run on this machine")
    BAD_INPUTS["fsdp without a gpu"] = (lambda t: ["train", "--config", DEBUG, "--trainer.strategy", "fsdp",
                                                   "--trainer.devices", "2"], "requires a GPU accelerator")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_sentence_and_nonzero_exit(tmp_path, case, capsys, monkeypatch):
    """`multimodal.cli.main` in this process (as the console script calls it, without paying for a
    fresh interpreter per case): exit status 2, the last line of stderr one sentence, no exception."""
    from multimodal.cli import main

    make_args, expected = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    assert main(make_args(tmp_path)) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
    empty = [f for f in tmp_path.glob("runs/*/version_*") if not any(f.iterdir())]
    assert not empty, "a run that fails before writing anything gives its version folder back"
    if case == "synthetic data into a user's folder":
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt", "shard-000000.tar"]


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_cli("train", "--config", DEBUG, "--model.model_name", "ViT-Q-99", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_two_process_ddp_run_through_the_cli(tmp_path):
    """Lightning's ddp strategy re-launches the command: run it as a user would, outside pytest."""
    proc = run_cli("train", "--config", DEBUG, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                   "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "debug" / "version_0" / "metrics.csv").open()))
    first = next(r for r in rows if r["train/loss"])
    # The loss of the first step is near ln(global batch) = ln(2 x 32): the ranks score against
    # each other's gathered features, not just their own 32 (ln 32 = 3.47).
    assert abs(float(first["train/loss"]) - math.log(64)) < 0.35
    timed = next(r for r in rows if r["train/samples_per_second"])
    assert float(timed["train/samples_per_second"]) == pytest.approx(
        2 * float(timed["train/samples_per_second_per_device"]))


def _claim(root: str, start, out) -> None:
    from multimodal.cli.train import claim_version

    start.wait()
    out.put(claim_version(Path(root)))


def test_runs_started_at_once_claim_different_version_folders(tmp_path):
    """Three `multimodal train` runs started at once in one folder once all wrote into version_0."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    start, out = context.Event(), context.Queue()
    (tmp_path / "runs" / "version_0").mkdir(parents=True)
    procs = [context.Process(target=_claim, args=(str(tmp_path / "runs"), start, out)) for _ in range(6)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
    assert sorted(out.get(timeout=5) for _ in procs) == [1, 2, 3, 4, 5, 6]


def test_the_other_ranks_take_the_version_rank_zero_claimed(tmp_path, monkeypatch):
    from multimodal.cli.train import CLAIMED, run_version

    root = tmp_path / "runs" / "debug"
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", CLAIMED):
        monkeypatch.delenv(var, raising=False)
    assert run_version(root) == 0 and run_version(root) == 1  # rank 0 claims afresh each time
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started: inherits the claim
    assert run_version(root) == 1
    monkeypatch.setenv("RANK", "3")  # torchrun's rank 3, without the variable: the latest, claims nothing
    monkeypatch.delenv(CLAIMED)
    assert run_version(root) == 1 and sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]


def test_a_metric_that_first_appears_late_gets_its_column(tmp_path):
    """A first NaN step or a first bad sample of a new kind adds a metric after rows were written: the
    CSV gets a new column (one writer per folder: the version claim keeps runs apart)."""
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    logger.log_metrics({"train/loss": 3.0}, step=0)
    logger.save()
    logger.log_metrics({"train/loss": 2.0, "train/nonfinite_steps": 1.0}, step=5)
    logger.save()
    rows = list(csv.DictReader((tmp_path / "run" / "version_0" / "metrics.csv").open()))
    assert [r["train/nonfinite_steps"] for r in rows] == ["", "1.0"]


LIGHT = {  # commands that stop at their arguments, before any work: nothing heavy imported
    "help": ["--help"],
    "eval help": ["eval", "--help"],
    "export of a missing checkpoint": ["export", "--checkpoint", "nope.ckpt", "--out", "m.safetensors"],
    "embed of a missing text file": ["embed", "--checkpoint", "nope.ckpt", "--texts", "nope.txt", "--out", "e"],
    "retrieval over a missing folder": ["eval", "retrieval", "--embeddings", "nope"],
    "zeroshot over a missing folder": ["eval", "zeroshot", "--checkpoint", "x.ckpt", "--images", "nope"],
    "zeroshot with a preset and class names": ["eval", "zeroshot", "--checkpoint", "x.ckpt", "--images", "nope",
                                               "--preset", "cifar10", "--classnames", "names.txt"],
    "search of a missing index": ["search", "--index", "nope", "--text", "a dog"],
    "plot of a missing run": ["plot", "nope"],
    "shards of a missing csv": ["shards", "csv", "--csv", "nope.csv", "--images", ".", "--out", "o"],
    "karpathy shards of a missing split file": ["shards", "karpathy", "--json", "nope.json", "--images", ".",
                                                "--out", "o"],
}


def test_help_and_argument_errors_import_no_heavy_library(tmp_path):
    """`multimodal --help` and mistakes found in the arguments alone answer without importing torch,
    Lightning, open_clip or the image and plotting libraries (13-14 s each before)."""
    script = (
        "import sys, json\n"
        "from multimodal.cli import main\n"
        "heavy = ('torch', 'pytorch_lightning', 'lightning', 'open_clip', 'webdataset', 'matplotlib', 'PIL', 'numpy')\n"
        "out = {}\n"
        f"for case, args in {LIGHT!r}.items():\n"
        "    try:\n"
        "        code = main(args)\n"
        "    except SystemExit as exc:\n"
        "        code = exc.code\n"
        "    out[case] = [code, sorted({m.split('.')[0] for m in sys.modules} & set(heavy))]\n"
        "print(json.dumps(out))\n"
    )
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (code, heavy) in result.items():
        assert code == (0 if "help" in case else 2) and heavy == [], (case, code, heavy)
