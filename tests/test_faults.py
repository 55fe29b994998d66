"""Bad data: every kind of broken sample or shard is skipped and counted by kind, training goes on
through 1-5 % of them, and too many stop the run with one sentence."""

import functools
import http.server
import io
import json
import os
import random
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from multimodal.data import decode
from multimodal.data.decode import MAX_IMAGE_PIXELS, decode_record, read_record
from multimodal.data.faults import SAMPLE_KINDS, BadSample
from multimodal.data.formats import MANIFEST
from multimodal.data.shards import write_synthetic
from tests.conftest import REPO, run_cli
from tests.test_pipeline import batches, stream, write_tar

DEBUG = str(REPO / "configs" / "debug.yaml")


def decode_sample(raw: dict, min_side: int | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS):
    """(image, captions, json) of a raw sample, as every reader decodes it: `read_record`, then `decode_record`."""
    record = read_record(raw, max_pixels=max_pixels)
    return decode_record(record, min_side), record.captions, record.meta


def jpeg(side=96, seed=0) -> bytes:
    noise = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb() -> bytes:
    """A 1 kB JPEG whose header declares 20,000 x 20,000 pixels: 1.2 GB if decoded."""
    data = bytearray(jpeg(side=16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20_000).to_bytes(2, "big") * 2
    return bytes(data)


def caption(text="a photo") -> dict:
    return {"json": json.dumps({"captions": [text]}).encode()}


BROKEN = {  # kind -> members of a sample of that kind
    "no image": lambda: caption(),
    "empty image": lambda: {"jpg": b"", **caption()},
    "not an image": lambda: {"jpg": b"<html>404 Not Found</html>", **caption()},
    "truncated image": lambda: {"jpg": jpeg()[:2000], **caption()},
    "corrupt image": lambda: {"jpg": jpeg()[:600] + bytes(range(256)) * 8, **caption()},
    "oversized image": lambda: {"jpg": bomb(), **caption()},
    "no caption": lambda: {"jpg": jpeg()},
    "empty caption": lambda: {"jpg": jpeg(), **caption("   ")},
    "unreadable caption": lambda: {"jpg": jpeg(), "json": b"{not json"},
}


def test_every_kind_has_a_test():
    assert sorted(BROKEN) == sorted(SAMPLE_KINDS)


@pytest.mark.parametrize("kind", BROKEN)
def test_each_broken_sample_is_named_by_its_kind(kind):
    with pytest.raises(BadSample) as raised:
        decode_sample(BROKEN[kind](), min_side=64)
    assert raised.value.kind == kind
    with pytest.raises(BadSample, match=kind):  # evaluation's full-size decoding too
        decode_sample(BROKEN[kind]())


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    def decoding(*args, **kwargs):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(decode, "decode_jpeg_pixels", decoding)
    monkeypatch.setattr(Image.Image, "convert", decoding)
    with pytest.raises(BadSample, match="oversized image"):
        decode_sample(BROKEN["oversized image"](), min_side=64)
    # a limit of None lets big images through (to the decoder, which would then run)
    with pytest.raises(AssertionError, match="decoded"):
        decode_sample(BROKEN["oversized image"](), min_side=64, max_pixels=None)


def test_image_files_to_embed_get_the_same_size_guard(tmp_path, monkeypatch, caplog):
    """`embed --images`, `search --image` and `eval zeroshot --images` read files through this guard."""
    from multimodal.data.sources import read_image_file

    def decoding(*args, **kwargs):
        raise AssertionError("the bomb was decoded")

    monkeypatch.setattr(decode, "decode_jpeg_pixels", decoding)
    monkeypatch.setattr(Image.Image, "convert", decoding)
    (tmp_path / "bomb.png").write_bytes(bomb())
    assert read_image_file(tmp_path / "bomb.png", 224) is None
    assert "oversized image" in caplog.text


def test_a_command_shows_the_images_it_skips_on_stderr(cli, trained, tmp_path):
    """The library warns through logging (`multimodal.data`); the command line puts the warnings on stderr,
    from the data workers too."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "good.png")
    (images / "bad.jpg").write_bytes(b"not an image")
    proc = cli("embed", "--checkpoint", str(trained[0]), "--images", str(images), "--out", str(tmp_path / "emb"),
               "--num_workers", "1", "--dtype", "float32", "--accelerator", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipping {images / 'bad.jpg'}: not an image" in proc.stderr.splitlines(), proc.stderr[-2000:]


@pytest.fixture
def http_folder(tmp_path):
    """An HTTP server on localhost for `tmp_path/www`: shards at URLs, some of them missing."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def cut(path: Path) -> None:
    """Cut a tar off in the middle of an image's bytes, about two thirds in, as an interrupted copy
    leaves it (a cut exactly between members would end the tar early without an error)."""
    with tarfile.open(path) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    member = images[len(images) * 2 // 3]
    path.write_bytes(path.read_bytes()[:member.offset_data + member.size // 2])


def test_stream_counts_bad_samples_and_shard_faults_by_kind(tmp_path, http_folder):
    root, base = http_folder
    good = [{"__key__": f"g{i}", "jpg": jpeg(seed=i), **caption(f"photo {i}")} for i in range(12)]
    broken = [{"__key__": f"b{i}", **make()} for i, make in enumerate(BROKEN.values())]
    write_tar(root / "mixed.tar", good[:6] + broken)
    write_tar(root / "cut.tar", good[6:])
    cut(root / "cut.tar")
    urls = [f"{base}/mixed.tar", f"{base}/cut.tar", f"{base}/missing.tar", str(tmp_path / "gone.tar")]
    out = batches(stream(urls, batch_size=2, num_batches=12))  # 24 good samples: over two passes
    assert len(out) == 12
    totals: dict = {}
    for batch in out:
        for kind, n in batch.bad.items():
            totals[kind] = totals.get(kind, 0) + n
        assert batch.skipped == sum(n for k, n in batch.bad.items() if k in SAMPLE_KINDS)
        assert batch.read == 2 + batch.skipped
    assert set(totals) == set(BROKEN) | {"truncated shard", "missing shard"}
    assert totals["missing shard"] >= 2 and totals["truncated shard"] >= 1  # the 404 and the gone file


def inject(shards: Path, fraction: float, seed: int = 0) -> int:
    """Replace `fraction` of the samples of every shard with broken ones of every kind, in place."""
    rng, replaced = random.Random(seed), 0
    kinds = list(BROKEN)
    for path in sorted(shards.glob("*.tar")):
        samples = list(wds.WebDataset(str(path), shardshuffle=False))
        with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
            for sample in samples:
                sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                if rng.random() < fraction:
                    sample = {"__key__": sample["__key__"], **BROKEN[kinds[replaced % len(kinds)]]()}
                    replaced += 1
                writer.write(sample)
    return replaced


def test_training_goes_through_bad_samples_a_cut_shard_and_a_missing_url(tmp_path, http_folder):
    _, base = http_folder
    shards = tmp_path / "shards"
    write_synthetic(shards, 640, 80, image_size=64)
    replaced = inject(shards, 0.03)
    cut(sorted(shards.glob("*.tar"))[-1])
    assert 9 <= replaced <= 40
    spec = f"{shards}::{base}/missing-00000.tar"
    # in a process of its own, as a user runs it: its data worker logs the skipped samples to its stderr
    proc = run_cli("train", "--config", DEBUG, "--data.synthetic", "null", "--data.val_shards", "null",
                   "--data.train_shards", spec, "--data.num_samples", "512", "--trainer.max_steps", "24",
                   "--trainer.log_every_n_steps", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in proc.stderr.splitlines() if line.startswith("Bad data: skipped")]
    assert len(summary) == 1, proc.stderr[-3000:]
    assert "truncated shard" in summary[0] and "missing shard" in summary[0]
    assert sum(kind in summary[0] for kind in BROKEN) >= 5, summary
    assert "skipped sample" in proc.stderr and "further ones are counted" in proc.stderr  # shown while running
    metrics = (tmp_path / "runs" / "debug" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert "train/bad_samples" in header and "train/bad_fraction" in header
    assert "train/bad/missing_shard" in header


def test_too_many_bad_samples_stop_the_run_with_one_sentence(cli, tmp_path):
    shards = tmp_path / "shards"
    write_synthetic(shards, 1600, 200, image_size=64)
    inject(shards, 0.3)
    proc = cli("train", "--config", DEBUG, "--data.synthetic", "null", "--data.val_shards", "null",
               "--data.train_shards", str(shards), "--data.max_bad_fraction", "0.1", "--trainer.max_steps", "60",
               cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "more than data.max_bad_fraction = 0.1" in last, last
    assert (tmp_path / "shards" / MANIFEST).is_file()  # the shards are left as they were


def fit(tmp_path, callbacks, max_steps=8, log_every_n_steps=50, **module_args):
    import pytorch_lightning as pl

    from multimodal.data.datamodule import ShardDataModule
    from multimodal.recipe import build_module

    if not (tmp_path / "data").exists():
        write_synthetic(tmp_path / "data", num_samples=64, shard_size=16)
    module = build_module("tiny", lr=1e-3, warmup_steps=1, **module_args)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=tmp_path, log_every_n_steps=log_every_n_steps)
    trainer.fit(module, datamodule=ShardDataModule(str(tmp_path / "data"), batch_size=8, num_workers=0))
    return module, trainer


def test_a_nonfinite_loss_skips_its_step_and_training_goes_on(tmp_path):
    import pytorch_lightning as pl
    import torch

    from tests.scripts.poison import PoisonBatches

    class Weights(pl.Callback):
        def __init__(self):
            self.seen = {}  # step -> the parameters at the start of each batch of that step

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.setdefault(trainer.global_step, []).append([p.detach().clone() for p in module.parameters()])

    weights = Weights()
    from multimodal.monitor import TrainingHealth

    module, trainer = fit(tmp_path, [weights, PoisonBatches([3, 4])])
    health = next(c for c in trainer.callbacks if isinstance(c, TrainingHealth))
    assert health.nonfinite_steps == 2 and module.global_step == 8
    at = {step: seen[0] for step, seen in weights.seen.items()}
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(at[a], at[b]))  # noqa: E731
    assert same(3, 5)  # steps 3 and 4 (Lightning counts them) changed nothing
    assert not same(2, 3) and not same(5, 6)  # the steps around them trained
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("log_every, stopped_at", [(1, 5), (4, 8), (50, 10)])
def test_nonfinite_losses_in_a_row_stop_with_the_step_and_a_hint(tmp_path, log_every, stopped_at):
    """Counted on the device, read on logging steps: the run stops at the first logging step after the
    third NaN step in a row (or at its end), naming the step at which the limit was reached."""
    import pytorch_lightning as pl

    from multimodal.errors import UserError
    from tests.scripts.poison import PoisonBatches

    steps = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    with pytest.raises(UserError, match=r"NaN or infinite for 3 steps in a row, the last at step 4: lower model.lr"):
        fit(tmp_path, [PoisonBatches(range(2, 100)), Steps()], max_steps=10, max_nonfinite_steps=3,
            log_every_n_steps=log_every)
    assert steps[-1] == stopped_at


def test_two_ranks_on_uneven_shards_finish_and_agree_to_skip_a_nonfinite_step(tmp_path):
    """2 DDP ranks x 2 workers over 8 shards of 60 samples and one of 32, validation on a single
    shard, and a NaN loss on rank 0 alone in its batches 3 and 4: no hang (the timeout), no crash."""
    config = tmp_path / "ddp.yaml"
    config.write_text(json.dumps({"trainer": {"devices": 2, "strategy": "ddp", "callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        {"class_path": "poison.PoisonBatches", "init_args": {"batches": [3, 4], "rank": 0}}]}}))
    path = os.pathsep.join(filter(None, [str(REPO / "tests" / "scripts"), os.environ.get("PYTHONPATH")]))
    proc = run_cli("train", "--config", DEBUG, "--config", str(config), "--data.num_workers", "2",
                   "--data.synthetic.shard_size", "60", cwd=tmp_path, timeout=300, env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Skipped 2 steps whose loss was NaN or infinite." in proc.stderr
    sizes = json.loads((tmp_path / "runs" / "debug" / "data" / "train" / MANIFEST).read_text())
    assert len(set(sizes.values())) == 2 and len(sizes) % 4 != 0
    assert (tmp_path / "runs" / "debug" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_a_data_worker_error_is_one_sentence(cli, tmp_path):
    """An error raised inside a DataLoader worker reaches the user as its one sentence, not as the
    worker's traceback that PyTorch re-raises it with."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "shard-000000.tar", [{"__key__": f"{i}", "jpg": jpeg(side=16)} for i in range(50)])
    (shards / MANIFEST).write_text(json.dumps({"shard-000000.tar": 50}))
    proc = cli("train", "--config", DEBUG, "--data.synthetic", "null", "--data.val_shards", "null",
               "--data.train_shards", str(shards), "--data.batch_size", "8", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 10000 samples in a row") and "Caught" not in last, last


@pytest.mark.parametrize("exc, kind", [
    (FileNotFoundError(2, "No such file or directory"), "missing shard"),
    (tarfile.ReadError("empty file"), "missing shard"),  # a 404 or a failed pipe: gave nothing
    (OSError("(['curl', '-f', 'http://host/x.tar'],): exit 22 (read)"), "missing shard"),  # curl -f on a 404
    (tarfile.ReadError("unexpected end of data"), "truncated shard"),
    (ValueError("something else"), "unreadable shard"),
])
def test_shard_faults_are_named_whichever_way_webdataset_reports_them(exc, kind):
    from multimodal.data.faults import shard_fault_kind

    assert shard_fault_kind(exc) == kind
