"""`embed` with its work split: two ranks under torchrun, and --parts ranges run side by side and one after the
other, each writing, byte for byte, the folder one process writes; the metadata parquet with img2dataset's json
fields; autofaiss indexing our folder (in its own venv: it pins numpy < 2); a bucket as --out, resumed from what
it holds; bad --parts.

The splits are compared at one thread a process (torchrun's default): on the CPU the sums of a matrix product
follow the thread count, as they follow the kernel chosen on a GPU."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import limit_memory
from tests.layouts import write_img2dataset
from tests.s3 import keys

PARTS = 4  # img2dataset shards of 5 URLs, every 6th failed to download


def photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    image = Image.new("RGB", (64, 48), tuple(int(c) for c in rng.integers(0, 255, 3)))
    x, y = (int(v) for v in rng.integers(0, 32, 2))
    ImageDraw.Draw(image).rectangle((x, y, x + 24, y + 12), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("i2d") / "shards"
    photos = [(f"photo{i}.jpg", photo(i), [f"photo number {i}", f"another caption of {i}"]) for i in range(20)]
    write_img2dataset(folder, photos, per_shard=5, failed_every=6)
    return folder


def embed(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`multimodal embed ARGS` in this process at one thread, as each rank of a launcher runs."""
    from multimodal.cli import main

    threads, saved = torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(1)
    try:
        os.environ.update(env or {})
        code = main(["embed", *args])
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stderr or "")[-3000:]
    return proc


@pytest.fixture(scope="module")
def args(trained, shards) -> list[str]:
    return ["--checkpoint", str(trained[0]), "--shards", str(shards), "--num_workers", "0", "--batch_size", "2",
            "--dtype", "float32"]


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "emb"
    ok(embed(*args, "--out", str(out)))
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def index_keys(folder: Path) -> list[str]:
    return [json.loads(line)["key"] for p in sorted((folder / "img_index").glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def test_two_ranks_under_torchrun_write_the_folder_of_one_process(args, reference, tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "multimodal", "embed", *args, "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_memory,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 device(s)" in proc.stdout
    assert files(out) == files(reference)
    assert len(files(reference)) == 1 + 1 + 5 * PARTS  # .lock, info.json, and five files a part


def test_part_ranges_side_by_side_and_one_after_the_other_write_the_folder_of_one_process(args, reference, tmp_path):
    """While another process embeds part 0 (holds its lock), a run of parts 0:2 is refused and a run of 2: goes
    ahead beside it; once that process has gone, 0:2 completes the folder."""
    out = tmp_path / "emb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from multimodal.eval.embed import claim\n"
         "with claim(Path(sys.argv[1])) as held:\n    held.parts([0], lambda p: False)\n    print('held', flush=True)\n"
         "    sys.stdin.read()", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert embed(*args, "--out", str(out), "--parts", "0:2").returncode == 2
        ok(embed(*args, "--out", str(out), "--parts", "2:"))
    finally:
        holder.communicate("", timeout=60)
    ok(embed(*args, "--out", str(out), "--parts", "0:2"))
    assert files(out) == files(reference)
    inodes = {p: p.stat().st_ino for p in out.rglob("*") if p.is_file()}
    ok(embed(*args, "--out", str(out), "--parts", "1:3"))  # done already: nothing rewritten
    assert files(out) == files(reference)
    assert {p: p.stat().st_ino for p in out.rglob("*") if p.is_file()} == inodes  # a rewrite is a new file


def test_the_metadata_parquet_holds_a_row_per_image_with_the_json_fields(args, reference, tmp_path):
    tables = [pq.read_table(p) for p in sorted((reference / "metadata").glob("*.parquet"))]
    assert len(tables) == PARTS
    rows = [row for table in tables for row in table.to_pylist()]
    assert [r["key"] for r in rows] == index_keys(reference) and len(rows) == 20 - 3  # 3 failed downloads
    assert tables[0].column_names == ["key", "caption", "url", "file_name", "error_message", "exif", "height",
                                      "original_height", "original_width", "sha256", "status", "width"]
    for row in rows:
        i = int(row["url"].removeprefix("https://example.org/photo").removesuffix(".jpg"))
        assert row["caption"] == f"photo number {i}" and row["status"] == "success" and row["file_name"] is None
        assert (row["width"], row["height"], row["exif"], row["error_message"]) == (64, 48, "{}", None)
    assert str(tables[0].schema.field("width").type) == "int64"
    # for a folder of images: their file names; for texts: a row a text
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(photo(0))
    (tmp_path / "texts.txt").write_text("one\ntwo\nthree\n")
    for source, out in (("--images", "imgs"), ("--texts", "texts.txt")):
        ok(embed(*args[:2], source, str(tmp_path / out), "--out", str(tmp_path / f"emb-{out}"), "--num_workers", "0"))
    assert pq.read_table(tmp_path / "emb-imgs" / "metadata" / "part-00000.parquet").to_pylist() == [
        {"key": "a.jpg", "caption": None, "url": None, "file_name": str(tmp_path / "imgs" / "a.jpg")}]
    texts = pq.read_table(tmp_path / "emb-texts.txt" / "metadata" / "part-00000.parquet").to_pylist()
    assert [(r["key"], r["caption"]) for r in texts] == [("000000000", "one"), ("000000001", "two"),
                                                         ("000000002", "three")]


AUTOFAISS = r"""
import json, sys
from autofaiss import build_index
from embedding_reader import EmbeddingReader
emb, out = sys.argv[1], sys.argv[2]
index, infos = build_index(embeddings=emb + "/img_emb", index_path=out + "/knn.index",
                           index_infos_path=out + "/infos.json", max_index_memory_usage="100M", metric_type="ip",
                           nb_cores=1, verbose=40)
reader = EmbeddingReader(emb + "/img_emb", file_format="parquet_npy", metadata_folder=emb + "/metadata",
                         meta_columns=["key", "caption", "url"])
keys = [k for _, meta in reader(batch_size=1000, show_progress=False) for k in meta["key"]]
print(json.dumps({"ntotal": index.ntotal, "keys": keys}))
"""


def test_autofaiss_indexes_our_folder_with_its_metadata(reference, tmp_path):
    from scripts.reference_venvs import AUTOFAISS_PACKAGES, AUTOFAISS_VENV, reference_python

    try:
        python = reference_python(AUTOFAISS_VENV, AUTOFAISS_PACKAGES)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot install autofaiss into {AUTOFAISS_VENV}: {exc}")
    proc = subprocess.run([str(python), "-c", AUTOFAISS, str(reference), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["ntotal"] == 17 and found["keys"] == index_keys(reference)


def test_a_bucket_as_out_is_resumed_from_the_parts_it_holds(s3, args, reference, tmp_path, capfd):
    env = {**s3["writer"], "MULTIMODAL_STAGING": str(tmp_path / "staging")}
    ok(embed(*args, "--out", "s3://bkt/emb", "--parts", "0:2", env=env))
    held = keys(s3["client"], "emb/")
    assert "emb/info.json" in held and "emb/img_index/part-00001.jsonl" in held
    assert not any(k.startswith("emb/img_emb/part-00002") for k in held) and not any("partial" in k for k in held)
    staging = tmp_path / "staging" / "s3" / "bkt" / "emb"
    assert sorted(p.name for p in staging.rglob("*") if p.is_file()) == [".lock", "info.json"]
    # a run killed between uploading part 1's arrays and its index: the bucket holds part 0 alone
    s3["client"].delete_object(Bucket="bkt", Key="emb/text_index/part-00001.jsonl")
    capfd.readouterr()
    ok(embed(*args, "--out", "s3://bkt/emb", env=env))
    assert "1 of 4 parts already done; embedding 3." in capfd.readouterr().out
    expected = {k: v for k, v in files(reference).items() if k != ".lock"}
    assert keys(s3["client"], "emb/") == sorted(f"emb/{k}" for k in expected)
    for name, data in expected.items():
        assert s3["client"].get_object(Bucket="bkt", Key=f"emb/{name}")["Body"].read() == data, name
    # another model's settings are refused, in one sentence naming the bucket
    assert embed(*args[:-2], "--out", "s3://bkt/emb", env=env).returncode == 2
    assert "other settings (dtype)" in capfd.readouterr().err


def test_a_folder_or_bucket_holding_other_files_is_written_only_with_overwrite(s3, args, tmp_path, capfd):
    env = {**s3["writer"], "MULTIMODAL_STAGING": str(tmp_path / "staging")}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    s3["client"].put_object(Bucket="bkt", Key="theirs/notes.txt", Body=b"the user's")
    for out in (str(tmp_path / "mine"), "s3://bkt/theirs"):
        capfd.readouterr()
        assert embed(*args, "--out", out, "--parts", "0:1", env=env).returncode == 2
        assert f"{out} is not empty and is not an embedding folder" in capfd.readouterr().err
        ok(embed(*args, "--out", out, "--parts", "0:1", "--overwrite", env=env))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's" and (tmp_path / "mine" / "info.json").is_file()
    assert {"theirs/notes.txt", "theirs/info.json", "theirs/img_index/part-00000.jsonl"} <= set(
        keys(s3["client"], "theirs/"))


def test_a_bucket_keeps_no_part_of_a_run_that_read_no_sample(s3, trained, tmp_path):
    """Every image unreadable: the run fails in one sentence and leaves no part done in the bucket (each was
    uploaded as it was finished), so that the same command, the images mended, embeds them."""
    from tests.test_hostile_eval import colour_folder

    bad = colour_folder(tmp_path / "bad", readable=False)
    env = {**s3["writer"], "MULTIMODAL_STAGING": str(tmp_path / "staging")}
    command = ["--checkpoint", str(trained[0]), "--images", str(bad), "--num_workers", "0", "--out", "s3://bkt/none"]
    assert embed(*command, env=env).returncode == 2
    assert not [k for k in keys(s3["client"], "none/") if "_index/" in k or "_emb/" in k]
    for path in bad.rglob("*.jpg"):
        Image.new("RGB", (40, 40), (10, 200, 10)).save(path)
    ok(embed(*command, env=env))
    assert "none/img_index/part-00000.jsonl" in keys(s3["client"], "none/")


@pytest.mark.parametrize("parts, expected", [("x", "must be START:END"), ("3:1", "holds no part"),
                                             ("7:", "starts past the last part: "), ("1:2:3", "must be START:END")])
def test_bad_parts_are_one_sentence(args, tmp_path, capfd, parts, expected):
    assert embed(*args, "--out", str(tmp_path / "emb"), "--parts", parts).returncode == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "emb").exists()


def test_devices_other_than_the_launchers_are_refused(args, tmp_path, capfd):
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert embed(*args, "--out", str(tmp_path / "emb"), "--devices", "4", env=launched).returncode == 2
    assert "does not match the launcher's 2 processes" in capfd.readouterr().err
