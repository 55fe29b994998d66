"""embed / eval retrieval / eval zeroshot through the CLI: equal results by every route, resume."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from multimodal.data.shards import write_synthetic
from multimodal.eval.embed import load_folder
from multimodal.eval.zeroshot import accuracy
from tests.conftest import REPO, run_cli

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("val") / "shards"
    write_synthetic(folder, num_samples=70, shard_size=10, first_index=5000)  # 7 parts, 3 captions each
    return folder


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(folder: Path, kind: str) -> list[dict]:
    return [json.loads(line) for p in sorted((folder / f"{kind}_index").glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def test_embed_then_eval_equals_eval_from_shards(cli, trained, shards, tmp_path):
    ckpt, _ = trained
    ok(cli("embed", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(tmp_path / "emb"),
           "--dtype", "float32", "--batch_size", "4", "--num_workers", "2", cwd=tmp_path))
    assert len(rows(tmp_path / "emb", "img")) == 70 and len(rows(tmp_path / "emb", "text")) == 210
    assert np.load(tmp_path / "emb" / "img_emb" / "part-00000.npy").shape == (10, 128)
    ok(cli("eval", "retrieval", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "a.json"),
           "--chunk_size", "16", cwd=tmp_path))
    proc = ok(cli("eval", "retrieval", "--checkpoint", str(ckpt), "--shards", str(shards), "--batch_size", "4",
                  "--out", str(tmp_path / "b.json"), cwd=tmp_path))
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"] and a["num_images"] == b["num_images"] == 70 and a["num_texts"] == 210
    assert {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)} <= set(a["metrics"])
    for r in (a, b):  # CLIP_benchmark's layout, and the training step of the checkpoint beside it
        assert (r["task"], r["model"], r["language"], r["step"]) == ("zeroshot_retrieval", "tiny", "en", 3)
        assert Path(r["pretrained"]).resolve() == Path(r["checkpoint"]).resolve() == ckpt.resolve()
    assert (a["dataset"], b["dataset"]) == ("emb", shards.name)
    assert "text -> image" in proc.stdout and "chance" in proc.stdout


def test_embed_resumes_after_a_kill_without_duplicates_or_gaps(cli, trained, shards, tmp_path):
    ckpt, _ = trained
    args = ["--checkpoint", str(ckpt), "--shards", str(shards), "--dtype", "float32", "--batch_size", "2",
            "--num_workers", "0"]
    ok(cli("embed", *args, "--out", str(tmp_path / "full"), cwd=tmp_path))
    reference = load_folder(tmp_path / "full")

    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "multimodal", "embed", *args, "--out", str(out)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "text_index" / "part-00000.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Whatever the kill left, take away the last finished part's index too, leaving its arrays and
    # a stray temporary file: the state of a kill between writing a part's arrays and its index.
    finished = sorted((out / "text_index").glob("part-*.jsonl"))
    if finished:
        finished[-1].unlink()
    (out / "img_emb" / ".part-00006.npy.123-0a1b2c3d.partial").write_bytes(b"partial")
    before = len(list((out / "text_index").glob("part-*.jsonl")))
    proc = ok(cli("embed", *args, "--out", str(out), cwd=tmp_path))
    assert f"{before} of 7 parts already done" in proc.stdout
    resumed = load_folder(out)
    assert [r["key"] for r in resumed.image_rows] == [r["key"] for r in reference.image_rows]
    assert len({r["key"] for r in resumed.image_rows}) == 70
    assert resumed.text_rows == reference.text_rows
    torch.testing.assert_close(resumed.image_features, reference.image_features)
    torch.testing.assert_close(resumed.text_features, reference.text_features)
    assert torch.equal(resumed.text_to_image, reference.text_to_image)


def test_embed_on_two_devices_splits_parts(trained, shards, tmp_path):
    ckpt, _ = trained
    ok(run_cli("embed", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(tmp_path / "two"),
               "--accelerator", "cpu", "--devices", "2", "--num_workers", "0", "--dtype", "float32",
               cwd=tmp_path, timeout=300))
    ok(run_cli("embed", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(tmp_path / "one"),
               "--num_workers", "0", "--dtype", "float32", cwd=tmp_path))
    two, one = load_folder(tmp_path / "two"), load_folder(tmp_path / "one")
    assert two.image_rows == one.image_rows and two.text_rows == one.text_rows
    torch.testing.assert_close(two.image_features, one.image_features)


def test_embed_image_folder_and_text_file(cli, trained, tmp_path):
    ckpt, module = trained
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS.values()):
        Image.new("RGB", (50 + i, 40), colour).save(tmp_path / "imgs" / ("sub" if i else "") / f"{i}.png")
    (tmp_path / "texts.txt").write_text("a red square\n\ntwo blue circles\nthree green triangles\n")
    ok(cli("embed", "--checkpoint", str(ckpt), "--images", str(tmp_path / "imgs"), "--out",
           str(tmp_path / "ie"), "--part_size", "2", "--num_workers", "0", cwd=tmp_path))
    ok(cli("embed", "--checkpoint", str(ckpt), "--texts", str(tmp_path / "texts.txt"), "--out",
           str(tmp_path / "te"), "--num_workers", "0", cwd=tmp_path))
    assert [r["key"] for r in rows(tmp_path / "ie", "img")] == ["0.png", "sub/1.png", "sub/2.png"]
    assert np.load(tmp_path / "ie" / "img_emb" / "part-00001.npy").dtype == np.float16
    assert not (tmp_path / "ie" / "text_emb").exists()
    assert [r["caption"] for r in rows(tmp_path / "te", "text")] == ["a red square", "two blue circles",
                                                                      "three green triangles"]
    emb = np.load(tmp_path / "te" / "text_emb" / "part-00000.npy").astype(np.float32)
    from multimodal import arch

    with torch.no_grad():
        expected = module.model.eval().encode_text(arch.load("tiny").tokenizer(["a red square"]))
    np.testing.assert_allclose(emb[0], expected[0].numpy(), atol=2e-3)


def test_embed_with_jpegs_decoded_where_they_are_encoded_gives_the_same_embeddings(cli, trained, tmp_path):
    """`--decode gpu` (on this CPU run: decoded in the main process by the device path's code) against
    the workers' decoding: the same rows, embeddings within float noise of the pixels' tolerance."""
    from tests.test_decode import photo

    ckpt, _ = trained
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(photo(i, size=(160 + 8 * i, 120)))
    for decode in ("cpu", "gpu"):
        ok(cli("embed", "--checkpoint", str(ckpt), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / decode),
               "--num_workers", "0", "--dtype", "float32", "--decode", decode, cwd=tmp_path))
    workers, device = load_folder(tmp_path / "cpu"), load_folder(tmp_path / "gpu")
    assert device.image_rows == workers.image_rows and len(device.image_rows) == 6
    cosine = (device.image_features * workers.image_features).sum(-1)
    assert cosine.min() > 0.99, cosine


def test_embedding_folder_with_mismatched_parts(cli, trained, shards, tmp_path):
    ckpt, _ = trained
    out = tmp_path / "emb"
    ok(cli("embed", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out),
           "--num_workers", "0", cwd=tmp_path))
    np.save(out / "img_emb" / "part-00003.npy", np.zeros((4, 128), np.float16))
    proc = cli("eval", "retrieval", "--embeddings", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "img_emb/part-00003.npy has 4 rows but img_index/part-00003.jsonl lists 10" in proc.stderr
    # Embedding into that folder with another model is refused, and nothing is lost.
    proc = cli("embed", "--checkpoint", str(ckpt), "--shards", str(shards), "--out", str(out),
               "--dtype", "float32", cwd=tmp_path)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "img_emb" / "part-00000.npy").is_file()


def test_accuracy_metrics():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.3, 0.2, 0.5]])
    labels = torch.tensor([0, 1, 1, 2, 0])
    m = accuracy(logits, labels, 3)
    assert m["acc1"] == pytest.approx(3 / 5)
    assert math.isnan(m["acc5"])  # fewer than 5 classes: as CLIP_benchmark reports it
    assert accuracy(torch.cat([logits, torch.zeros(5, 2)], 1), labels, 5)["acc5"] == 1.0
    assert m["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def colour_folder(root: Path) -> Path:
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40 + 3 * i, 40), colour).save(root / name / f"{i}.jpg")
    return root


def test_zeroshot_on_image_folder_and_on_shards_agree(cli, trained, tmp_path):
    ckpt, _ = trained
    folder = colour_folder(tmp_path / "colours")
    with wds.TarWriter(str(tmp_path / "cls.tar"), encoder=False) as w:
        for label, name in enumerate(sorted(COLOURS)):  # ImageFolder labels: sorted folder names
            for i in range(4):
                w.write({"__key__": f"{name}{i}", "jpg": (folder / name / f"{i}.jpg").read_bytes(),
                         "cls": str(label).encode()})
    (tmp_path / "names.txt").write_text("\n".join(sorted(COLOURS)) + "\n")
    (tmp_path / "templates.txt").write_text("a {} shape\nsomething {}\n")
    common = ["--checkpoint", str(ckpt), "--classnames", str(tmp_path / "names.txt"), "--templates",
              str(tmp_path / "templates.txt")]
    ok(cli("eval", "zeroshot", *common, "--images", str(folder), "--out", str(tmp_path / "a.json"), cwd=tmp_path))
    ok(cli("eval", "zeroshot", *common, "--shards", str(tmp_path / "cls.tar"), "--out", str(tmp_path / "b.json"),
           cwd=tmp_path))
    ok(cli("eval", "zeroshot", *common, "--images", str(folder), "--decode", "gpu", "--num_workers", "0",
           "--out", str(tmp_path / "c.json"), cwd=tmp_path))  # decoded a batch at a time, in this process
    a, b, c = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc")
    assert str(a["metrics"]) == str(b["metrics"]) and a["num_images"] == 12 and a["num_classes"] == 3
    assert a["task"] == "zeroshot_classification" and a["dataset"] == "colours" and math.isnan(a["metrics"]["acc5"])
    assert c["num_images"] == 12 and abs(c["metrics"]["acc1"] - a["metrics"]["acc1"]) <= 1 / 12
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = cli("eval", "zeroshot", "--checkpoint", str(ckpt), "--classnames", str(empty), "--images",
               str(folder), cwd=tmp_path)
    assert proc.returncode == 2 and "is empty" in proc.stderr and "Traceback" not in proc.stderr


def test_validation_and_zeroshot_callback_during_training(cli, tmp_path):
    """Validation, and evaluations on standard splits logged under their benchmark names: a zero-shot preset
    (cifar10 over an ImageFolder named as its classes) and a retrieval split (shards, as `shards karpathy`
    writes them)."""
    from multimodal.data.shards import write_synthetic
    from multimodal.eval.presets import CIFAR10
    from tests.test_presets import image_folder

    folder = colour_folder(tmp_path / "colours")
    write_synthetic(tmp_path / "karpathy-test", num_samples=12, shard_size=12)
    callbacks = [("ZeroShotCallback", {"images": str(folder)}),
                 ("ZeroShotCallback", {"images": str(image_folder(tmp_path / "cifar", list(CIFAR10.classnames), 1)),
                                       "preset": "cifar10"}),
                 ("RetrievalCallback", {"shards": str(tmp_path / "karpathy-test"), "dataset": "mscoco_captions"})]
    args = [a for name, init in callbacks for a in (
        "--trainer.callbacks+", json.dumps({"class_path": f"multimodal.eval.callbacks.{name}", "init_args": init}))]
    ok(cli("train", "--config", str(REPO / "configs" / "debug.yaml"), "--trainer.max_steps", "6",
           "--trainer.val_check_interval", "3", *args, cwd=tmp_path))
    import csv

    metrics = list(csv.DictReader((tmp_path / "runs" / "debug" / "version_0" / "metrics.csv").open()))
    val = [r for r in metrics if r.get("val/loss")]
    assert [r["step"] for r in val] == ["2", "5"]
    for key in ("val/image_retrieval_recall@5", "val/text_retrieval_recall@10", "val/zeroshot/acc1",
                "val/zeroshot/mean_per_class_recall", "val/cifar10/acc1", "val/cifar10/acc5",
                "val/mscoco_captions/image_retrieval_recall@5", "val/mscoco_captions/text_retrieval_recall@1"):
        assert 0.0 <= float(val[-1][key]) <= 1.0, key
    assert "val/zeroshot/acc5" not in val[-1]  # 3 colours: no top-5 accuracy, as in CLIP_benchmark
