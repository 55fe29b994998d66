"""Evaluation, export, results, plots and search against odd and careless input (issue 22): odd templates,
`--ks` and results fields understood or refused; a user's files never rewritten unasked; a run that produces
nothing fails; a misspelled `eval` command named; two `embed` runs into one folder."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from multimodal.cli import main
from multimodal.data.shards import write_synthetic
from tests.conftest import limit_memory


def refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and one sentence on stderr's last line holding `words`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last.startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in last, (word, last)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory) -> Path:
    """An embedding folder of 8 synthetic scenes (2 parts), made by the tiny trained model."""
    root = tmp_path_factory.mktemp("embedded")
    write_synthetic(root / "shards", num_samples=8, shard_size=4)
    assert main(["embed", "--checkpoint", str(trained[0]), "--shards", str(root / "shards"), "--out",
                 str(root / "emb"), "--num_workers", "0"]) == 0
    return root / "emb"


def colour_folder(root: Path, readable: bool = True) -> Path:
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            if readable:
                Image.new("RGB", (40, 40), colour).save(root / name / f"{i}.jpg")
            else:
                (root / name / f"{i}.jpg").write_bytes(b"not an image at all")
    return root


# 1. Odd but parseable input: understood or refused, never misread.

@pytest.mark.parametrize("line", ["a {c} beside {}", "a photo of a {}}", "{0}", "a {name} photo", "{{}} a"])
def test_a_template_with_a_stray_brace_is_refused_naming_its_line(cli, tmp_path, line):
    (tmp_path / "m.ckpt").write_bytes(b"x")  # the templates are read before the weights
    (tmp_path / "templates.txt").write_text(f"a photo of a {{}}.\n\n{line}\n")
    proc = cli("eval", "zeroshot", "--checkpoint", "m.ckpt", "--images", str(colour_folder(tmp_path / "col")),
               "--templates", "templates.txt", cwd=tmp_path)
    refused(proc, "templates.txt line 3", line)


def test_ks_below_one_is_refused_and_a_repeated_k_counts_once(cli, embedded, tmp_path):
    for ks in (["-1"], ["0"], ["5", "0"]):
        refused(cli("eval", "retrieval", "--embeddings", str(embedded), "--ks", *ks, cwd=tmp_path),
                "--ks", "positive")
    proc = ok(cli("eval", "retrieval", "--embeddings", str(embedded), "--ks", "5", "1", "5",
                  "--out", "r.json", cwd=tmp_path))
    assert proc.stdout.count("R@5") == 1 and proc.stdout.count("R@1 ") == 1
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert [k for k in metrics if "recall@" in k] == [f"{d}_retrieval_recall@{k}" for k in (5, 1)
                                                     for d in ("image", "text")]


RESULT = {"dataset": "mscoco_captions", "model": "tiny", "pretrained": "", "task": "zeroshot_retrieval",
          "metrics": {"image_retrieval_recall@5": 0.5}, "language": "en", "step": 3}


@pytest.mark.parametrize("odd, field", [
    ({**RESULT, "step": "5"}, "step"),
    ({k: v for k, v in RESULT.items() if k != "dataset"}, "dataset"),
    ({**RESULT, "task": 7}, "task"),
    ({**RESULT, "dataset": ["a"]}, "dataset"),
    ([RESULT], None),
    ([{**RESULT, "step": "x"}], None),
    ("a string", None),
])
def test_plotting_results_with_an_odd_field_is_one_sentence_naming_file_and_field(cli, tmp_path, odd, field):
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "0.json").write_text(json.dumps(RESULT))
    (tmp_path / "evals" / "1.json").write_text(json.dumps(odd))
    refused(cli("plot", "evals", cwd=tmp_path), "1.json", *([repr(field)] if field else []))
    assert not (tmp_path / "evals" / "results.png").exists()


# 2. A user's files are never rewritten unasked.

def test_export_keeps_a_users_file_where_the_model_config_would_go(cli, trained, tmp_path):
    ckpt, _ = trained
    mine = tmp_path / "tiny.json"
    mine.write_text('{"my": "own notes"}\n')
    proc = cli("export", "--checkpoint", str(ckpt), "--out", "model.safetensors", cwd=tmp_path)
    refused(proc, "tiny.json", "--overwrite")
    assert mine.read_text() == '{"my": "own notes"}\n' and not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json"]  # nothing half-written beside it
    ok(cli("export", "--checkpoint", str(ckpt), "--out", "model.safetensors", "--overwrite", cwd=tmp_path))
    config = json.loads(mine.read_text())
    assert "embed_dim" in config
    # The config we would write, already there: a second export beside it leaves it as it is.
    ok(cli("export", "--checkpoint", str(ckpt), "--out", "again.safetensors", cwd=tmp_path))
    assert json.loads(mine.read_text()) == config


@pytest.mark.parametrize("table", [
    "dataset,model,step\nmscoco,tiny,3\nflickr,tiny,4,0.5\n",  # a row longer than the header
    "dataset,model,step\nmscoco,tiny\n",  # a row shorter than the header
    "dataset,acc1,acc1\nmscoco,0.1,0.2\n",  # a name twice: one value would be lost
])
def test_a_table_that_cannot_be_read_back_exactly_is_left_alone(cli, embedded, tmp_path, table):
    (tmp_path / "t.csv").write_text(table)
    proc = cli("eval", "retrieval", "--embeddings", str(embedded), "--out_table", "t.csv", cwd=tmp_path)
    refused(proc, "t.csv", "--overwrite")
    assert (tmp_path / "t.csv").read_text() == table
    ok(cli("eval", "retrieval", "--embeddings", str(embedded), "--out_table", "t.csv", "--overwrite", cwd=tmp_path))
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("dataset,model,pretrained,task")


def test_results_json_is_replaced_only_when_it_is_a_result(cli, embedded, tmp_path):
    notes = tmp_path / "notes.json"
    for text in ('{"my": "own notes"}\n', "[1, 2]\n", "not json\n"):
        notes.write_text(text)
        refused(cli("eval", "retrieval", "--embeddings", str(embedded), "--out", "notes.json", cwd=tmp_path),
                "notes.json", "--overwrite")
        assert notes.read_text() == text
    ok(cli("eval", "retrieval", "--embeddings", str(embedded), "--out", "notes.json", "--overwrite",
           cwd=tmp_path))
    assert json.loads(notes.read_text())["task"] == "zeroshot_retrieval"
    ok(cli("eval", "retrieval", "--embeddings", str(embedded), "--out", "notes.json", cwd=tmp_path))  # ours


# 3. Success means work was done.

def test_runs_that_produce_nothing_fail_with_a_sentence(cli, trained, tmp_path):
    ckpt, _ = trained
    bad = colour_folder(tmp_path / "bad", readable=False)
    refused(cli("eval", "zeroshot", "--checkpoint", str(ckpt), "--images", str(bad), "--num_workers", "0",
                cwd=tmp_path), "could be read")
    refused(cli("embed", "--checkpoint", str(ckpt), "--images", str(bad), "--out", "emb", "--num_workers", "0",
                cwd=tmp_path), "could be read", str(bad))
    # Nothing was marked done: the images, mended, are embedded by the same command.
    for path in bad.rglob("*.jpg"):
        Image.new("RGB", (40, 40), (10, 200, 10)).save(path)
    proc = ok(cli("embed", "--checkpoint", str(ckpt), "--images", str(bad), "--out", "emb", "--num_workers", "0",
                  cwd=tmp_path))
    assert "embedding 1" in proc.stdout
    assert len((tmp_path / "emb" / "img_index" / "part-00000.jsonl").read_text().splitlines()) == 4
    # An index whose parts hold no embedding: nothing to search.
    import numpy as np

    np.save(tmp_path / "empty.npy", np.zeros((0, 128), np.float16))
    (tmp_path / "empty.npy").replace(tmp_path / "emb" / "img_emb" / "part-00000.npy")
    (tmp_path / "emb" / "img_index" / "part-00000.jsonl").write_text("")
    refused(cli("search", "--index", "emb", "--text", "a red square", cwd=tmp_path), "no embeddings")


# 4. Help and mistakes are instant and clean.

def test_a_misspelled_eval_command_is_one_sentence_naming_the_nearest(cli, tmp_path):
    proc = cli("eval", "retreival", "--embeddings", "x", cwd=tmp_path)
    refused(proc, "'retreival'", "retrieval")
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    refused(cli("eval", "zzz", cwd=tmp_path), "'zzz'", "zeroshot")
    assert cli("eval", "--help", cwd=tmp_path).returncode == 0


# 5. Runs side by side.

def test_a_second_embed_into_a_folder_being_written_is_refused(cli, trained, tmp_path):
    """Two `embed` runs into one --out at once: the second refuses in one sentence while the first writes;
    once it has finished, the same command resumes its complete folder."""
    from multimodal.cli import train  # noqa: F401  imported before the race: the second run answers at once

    ckpt, _ = trained
    write_synthetic(tmp_path / "shards", num_samples=48, shard_size=4)
    args = ["embed", "--checkpoint", str(ckpt), "--shards", "shards", "--out", "emb", "--num_workers", "0",
            "--batch_size", "2"]
    first = subprocess.Popen([sys.executable, "-m", "multimodal", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=limit_memory,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "emb" / "info.json").is_file():  # the first run has claimed the folder
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        refused(cli(*args, cwd=tmp_path), "emb", "another run")
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    proc = ok(cli(*args, cwd=tmp_path))
    assert "12 of 12 parts already done" in proc.stdout
    assert not list((tmp_path / "emb").rglob("*.partial"))
    ok(cli("eval", "retrieval", "--embeddings", "emb", cwd=tmp_path))
