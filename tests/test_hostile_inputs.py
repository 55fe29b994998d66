"""Files users give, hostile or careless (issue 22): images and caption files that are pipes, devices, sparse
20 GB files or 50 MB captions are bounded; names in caption files stay under --images; odd but parseable
caption files are read as meant or refused in one sentence; a full disk is one sentence and leaves nothing
half-written; runs side by side share one set of synthetic scenes."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimodal.data.formats import expand_urls, read_records
from tests.conftest import limit_memory, run_cli

HUGE = 20 << 30  # a sparse file of this size costs no disk


def jpeg(path: Path, colour=(200, 40, 40), side: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), colour).save(path)
    return path


def hostile_images(folder: Path) -> None:
    """One good image beside `.jpg`s that are a sparse 20 GB file, a named pipe and a link to /dev/zero."""
    jpeg(folder / "a.jpg")
    (folder / "big.jpg").touch()
    os.truncate(folder / "big.jpg", HUGE)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")


def coco(path: Path, names, captions=None) -> Path:
    """A COCO captions file: image i + 1 is `names[i]`, with one caption each (or `captions[i]`)."""
    images = [{"id": i + 1, "file_name": name} for i, name in enumerate(names)]
    annotations = [{"id": i + 1, "image_id": i + 1, "caption": (captions or {}).get(i, f"picture {i}")}
                   for i in range(len(names))]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def read_back(folder: Path) -> dict[str, tuple[list[str], dict]]:
    return {r.key: (r.captions, r.meta) for r in read_records(expand_urls(str(folder)))}


def shards(cli, tmp_path: Path, source: str, *args: str, env: dict | None = None):
    return cli("shards", source, *args, "--out", str(tmp_path / "out"), "--num_workers", "2", cwd=tmp_path, env=env)


# 1. Resources bounded: only regular files, of bounded size, are read.

def test_shards_skip_images_that_are_sparse_pipes_or_devices(tmp_path):
    hostile_images(tmp_path / "img")
    captions = coco(tmp_path / "c.json", ["a.jpg", "big.jpg", "pipe.jpg", "zero.jpg"])
    done = run_cli("shards", "coco", "--captions", str(captions), "--images", "img", "--out", "out", cwd=tmp_path,
                   timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Wrote 1 samples in 1 shards" in done.stdout and "3 images could not be read" in done.stdout
    for name, why in (("big.jpg", "over the limit"), ("pipe.jpg", "not a regular file"),
                      ("zero.jpg", "not a regular file")):
        assert f"could not read {name}: " in done.stderr and why in done.stderr
    assert "MULTIMODAL_MAX_IMAGE_BYTES" in done.stderr  # how to raise the limit


READ_FOLDERS = """
from pathlib import Path
from multimodal.data.sources import ClassFolderSource, ImageFolderSource
for source in (ImageFolderSource(Path("img"), 10), ClassFolderSource(Path("."))):
    print([item.image_row["key"] for item in source.items(0)])
"""


def test_image_folders_skip_sparse_pipes_and_devices(tmp_path):
    """What `embed --images`, `caption --images` and `eval zeroshot --images` read (their sources), in a process
    of its own with its heap capped: a regression hangs or fills memory there, and fails here."""
    hostile_images(tmp_path / "img")
    done = subprocess.run([sys.executable, "-c", READ_FOLDERS], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, preexec_fn=limit_memory)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['a.jpg']", "['img/a.jpg']"]
    for name, why in (("big.jpg", "21474836480 bytes, over the limit"), ("pipe.jpg", "not a regular file"),
                      ("zero.jpg", "not a regular file")):
        assert done.stderr.count(f"skipping img/{name}: {why}") == 2


def sparse(path: Path) -> Path:
    path.touch()
    os.truncate(path, HUGE)
    return path


@pytest.mark.parametrize("command", [
    ("shards", "coco", "--captions", "c.json", "--images", "img", "--out", "out"),
    ("shards", "csv", "--csv", "c.csv", "--images", "img", "--out", "out"),
    ("shards", "karpathy", "--json", "c.json", "--images", "img", "--out", "out"),
])
def test_enormous_caption_files_are_refused_unread(tmp_path, command):
    (tmp_path / "img").mkdir()
    sparse(tmp_path / command[3])
    done = run_cli(*command, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: {command[3]} is 21474836480 bytes, over the limit of ")
    assert "MULTIMODAL_MAX_TEXT_FILE_BYTES" in done.stderr


def test_a_text_file_to_embed_over_the_limit_is_refused_unread(cli, tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"never loaded: the texts are read first")
    (tmp_path / "texts.txt").write_text("a dog\na cat\n")
    done = cli("embed", "--checkpoint", "x.ckpt", "--texts", "texts.txt", "--out", "emb", cwd=tmp_path,
               env={"MULTIMODAL_MAX_TEXT_FILE_BYTES": "8"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "texts.txt is 12 bytes, over the limit of 8 bytes (set MULTIMODAL_MAX_TEXT_FILE_BYTES to raise it)" \
        in done.stderr


@pytest.mark.parametrize("what", ["device", "pipe"])
@pytest.mark.parametrize("command", [
    ("shards", "coco", "--images", "img", "--out", "out", "--captions"),
    ("shards", "csv", "--images", "img", "--out", "out", "--csv"),
    ("shards", "karpathy", "--images", "img", "--out", "out", "--json"),
    ("embed", "--checkpoint", "x.ckpt", "--out", "emb", "--texts"),
    ("eval", "zeroshot", "--checkpoint", "x.ckpt", "--images", "img", "--classnames"),
])
def test_caption_files_that_are_devices_or_pipes_are_refused(cli, tmp_path, command, what):
    (tmp_path / "img").mkdir()
    if what == "pipe":
        os.mkfifo(tmp_path / "p")
    path = "/dev/zero" if what == "device" else "p"
    done = cli(*command, path, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"{path} is not a regular file (a pipe, a device or a socket)" in done.stderr


def test_long_captions_are_cut_where_they_are_read(cli, tmp_path):
    """A 1 MB caption costs what 10,000 characters cost: written cut (and said so), read cut from shards written
    elsewhere, and cut in a text file to embed. The model reads at most its context (77 tokens) of any of them."""
    from multimodal.userfiles import read_lines

    jpeg(tmp_path / "img" / "a.jpg")
    jpeg(tmp_path / "img" / "b.jpg")
    long = "a dog on the grass " * 60_000  # 1.1 MB
    cut = long[:10_000].rstrip()
    coco(tmp_path / "c.json", ["a.jpg", "b.jpg"], {0: long})
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img")
    assert done.returncode == 0, done.stderr
    assert "1 caption longer than 10000 characters was cut to its first 10000" in done.stdout
    samples = read_back(tmp_path / "out")
    assert samples["000000000001"][0] == [cut]
    assert samples["000000000002"][0] == ["picture 1"]

    import webdataset as wds  # a shard from elsewhere: its txt member is 1 MB

    with (tmp_path / "other.tar").open("wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        writer.write({"__key__": "x", "jpg": (tmp_path / "img" / "a.jpg").read_bytes(), "txt": long.encode()})
        writer.close()
    [record] = read_records([str(tmp_path / "other.tar")])
    assert record.captions == [cut]

    (tmp_path / "texts.txt").write_text(f"short\n{long}\n")
    assert read_lines(tmp_path / "texts.txt", "Text") == ["short", cut]


def test_limits_are_raised_or_lowered_by_environment_variables(cli, tmp_path):
    jpeg(tmp_path / "img" / "a.jpg")
    jpeg(tmp_path / "img" / "b.jpg", side=64)
    coco(tmp_path / "c.json", ["a.jpg", "b.jpg"], {0: "x" * 50})
    size = (tmp_path / "c.json").stat().st_size
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img",
                  env={"MULTIMODAL_MAX_TEXT_FILE_BYTES": str(size - 1)})
    assert done.returncode == 2 and f"c.json is {size} bytes, over the limit of {size - 1} bytes" in done.stderr
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img", "--overwrite",
                  env={"MULTIMODAL_MAX_IMAGE_BYTES": str((tmp_path / "img" / "a.jpg").stat().st_size),
                       "MULTIMODAL_MAX_CAPTION_CHARS": "20"})
    assert done.returncode == 0, done.stderr
    assert "Wrote 1 samples" in done.stdout and "could not read b.jpg" in done.stderr
    assert read_back(tmp_path / "out")["000000000001"][0] == ["x" * 20]
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img", "--overwrite",
                  env={"MULTIMODAL_MAX_IMAGE_BYTES": "lots"})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: The environment variable MULTIMODAL_MAX_IMAGE_BYTES must be a positive " \
                                  "whole number, got 'lots'."


# 2. Paths stay inside what the user named.

def test_names_that_climb_out_of_the_image_folder_are_not_read(cli, tmp_path):
    """`../x.jpg`, an absolute path: reported like missing images, never packed. A link inside --images is
    followed wherever it points (a folder of links into a dataset store is common): the name is confined."""
    outside = jpeg(tmp_path / "secret.jpg", (1, 2, 3))
    jpeg(tmp_path / "img" / "a.jpg")
    (tmp_path / "img" / "linked.jpg").symlink_to(outside)
    names = ["a.jpg", "../secret.jpg", str(outside), "sub/../../secret.jpg", "linked.jpg"]
    coco(tmp_path / "c.json", names)
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img")
    assert done.returncode == 0, done.stderr
    assert sorted(meta["file_name"] for _, meta in read_back(tmp_path / "out").values()) == ["a.jpg", "linked.jpg"]
    for name in names[1:4]:
        assert f"could not read {name}: not under the image folder" in done.stderr
    assert "3 images could not be read (listed above), 3 of them missing from img." in done.stdout


def test_karpathy_names_are_confined_and_dev_zero_is_never_read(tmp_path):
    jpeg(tmp_path / "secret.jpg")
    jpeg(tmp_path / "img" / "a.jpg")
    images = [{"filepath": "", "filename": "a.jpg"}, {"filepath": "/dev", "filename": "zero"},
              {"filename": "../secret.jpg"}]
    for im in images:
        im.update(split="test", sentences=[{"raw": "a picture"}])
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    done = run_cli("shards", "karpathy", "--json", "k.json", "--images", "img", "--out", "out", cwd=tmp_path,
                   timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Wrote 1 samples" in done.stdout and "test: 1 images, 1 captions" in done.stdout
    assert "could not read /dev/zero: not under the image folder" in done.stderr
    assert "could not read ../secret.jpg: not under the image folder" in done.stderr


def test_csv_names_are_confined(cli, tmp_path):
    jpeg(tmp_path / "secret.jpg")
    jpeg(tmp_path / "img" / "a.jpg")
    (tmp_path / "c.csv").write_text(f"image,caption\na.jpg,one\n../secret.jpg,two\n{tmp_path / 'secret.jpg'},three\n")
    done = shards(cli, tmp_path, "csv", "--csv", "c.csv", "--images", "img")
    assert done.returncode == 0, done.stderr
    assert [meta["file_name"] for _, meta in read_back(tmp_path / "out").values()] == ["a.jpg"]
    assert "2 of them missing from img" in done.stdout


# 3. Odd but parseable input: understood, or refused in one sentence.

def test_coco_ids_written_as_strings_are_read_as_the_numbers(cli, tmp_path):
    jpeg(tmp_path / "img" / "a.jpg")
    jpeg(tmp_path / "img" / "b.jpg")
    (tmp_path / "c.json").write_text(json.dumps({
        "images": [{"id": "42", "file_name": "a.jpg"}, {"id": 7, "file_name": "b.jpg"}],
        "annotations": [{"id": "2", "image_id": 42, "caption": "second"},
                        {"id": 1, "image_id": "42", "caption": "first"},
                        {"id": 3, "image_id": "7", "caption": "bee"}]}))
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img")
    assert done.returncode == 0, done.stderr
    samples = read_back(tmp_path / "out")
    assert {k: (c, m["image_id"]) for k, (c, m) in samples.items()} == {
        "000000000007": (["bee"], 7), "000000000042": (["first", "second"], 42)}


@pytest.mark.parametrize("images,annotations,says", [
    ([{"id": "forty-two", "file_name": "a.jpg"}], [], "image 0 has id 'forty-two', not a whole number"),
    ([{"id": 1.5, "file_name": "a.jpg"}], [], "image 0 has id 1.5, not a whole number"),
    ([{"id": True, "file_name": "a.jpg"}], [], "image 0 has id True, not a whole number"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": "x", "caption": "c"}],
     "annotation 0 has image_id 'x', not a whole number"),
    ([{"id": 1, "file_name": 123}], [{"image_id": 1, "caption": "c"}],
     "image 0 has file_name 123, not a file name"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": 5}], "annotation 0 has caption 5, not text"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [{"image_id": 1, "caption": "c"}],
     "lists image id 1 twice (images 0 and 1)"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": "1", "file_name": "a.jpg"}], [{"image_id": 1, "caption": "c"}],
     "lists image id 1 twice (images 0 and 1)"),
    ([{"id": 1}], [], "has an entry without the COCO field 'file_name' (image 0;"),
    ([{"id": 1, "file_name": "a.jpg"}], ["text"], "annotation 0 is not a JSON object"),
])
def test_odd_coco_files_are_refused_in_one_sentence(cli, tmp_path, images, annotations, says):
    jpeg(tmp_path / "img" / "a.jpg")
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    done = shards(cli, tmp_path, "coco", "--captions", "c.json", "--images", "img")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: Captions file c.json") and says in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_image_listed_twice_in_a_karpathy_file_is_refused(cli, tmp_path):
    jpeg(tmp_path / "img" / "val" / "a.jpg")
    images = [{"filepath": "val", "filename": "a.jpg", "split": "test", "sentences": [{"raw": f"one {i}"}]}
              for i in range(2)]
    (tmp_path / "k.json").write_text(json.dumps({"images": [{"filename": "b.jpg", "split": "train",
                                                             "sentences": [{"raw": "b"}]}, *images]}))
    done = shards(cli, tmp_path, "karpathy", "--json", "k.json", "--images", "img")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "k.json lists val/a.jpg twice (images 1 and 2)" in done.stderr


def test_csv_captions_with_unquoted_commas_are_read_whole(cli, tmp_path):
    jpeg(tmp_path / "img" / "a.jpg")
    jpeg(tmp_path / "img" / "b.jpg")
    (tmp_path / "c.csv").write_text('image,caption\na.jpg,A dog, a ball, and a stick .\n'
                                    'b.jpg,"quoted, as it should be"\n')
    done = shards(cli, tmp_path, "csv", "--csv", "c.csv", "--images", "img")
    assert done.returncode == 0, done.stderr
    assert sorted(c for c, _ in read_back(tmp_path / "out").values()) == [
        ["A dog, a ball, and a stick ."], ["quoted, as it should be"]]


def test_csv_with_more_fields_than_its_header_elsewhere_is_refused(cli, tmp_path):
    jpeg(tmp_path / "img" / "a.jpg")
    (tmp_path / "c.csv").write_text("caption,image\none,a.jpg\nA dog, a ball,a.jpg\n")
    done = shards(cli, tmp_path, "csv", "--csv", "c.csv", "--images", "img")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "c.csv line 3 has 3 fields, its header 2" in done.stderr and "quote" in done.stderr


def test_csv_with_a_quote_left_open_is_refused_naming_its_line(cli, tmp_path):
    jpeg(tmp_path / "img" / "a.jpg")
    (tmp_path / "c.csv").write_text('image,caption\na.jpg,one\na.jpg,"never closed\n' + "a.jpg,two\n" * 30_000)
    done = shards(cli, tmp_path, "csv", "--csv", "c.csv", "--images", "img")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "c.csv line 3 has a field of over 131072 characters: a quote (\") left open" in done.stderr


def test_a_key_twice_is_never_written(tmp_path):
    from multimodal.data.shards import Sample, write_shards
    from multimodal.errors import UserError

    samples = [Sample("k1", b"x", ["a"]), Sample("k2", b"y", ["b"]), Sample("k1", b"z", ["c"])]
    with pytest.raises(UserError, match="two samples with the key k1"):
        write_shards(samples, tmp_path / "out", shard_size=2)
    assert list((tmp_path / "out").iterdir()) == []  # not the first shard either


# 4. A full disk: one sentence, nothing half-written.

def test_shards_on_a_full_disk_are_one_sentence_and_leave_nothing_half_written(cli, tmp_path, small_disk):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    names = [f"{i}.jpg" for i in range(40)]
    for name in names:  # noise does not compress: about 20 KB each, more than the disk holds
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "img" / name, quality=95)
    coco(tmp_path / "c.json", names)
    done = cli("shards", "coco", "--captions", "c.json", "--images", "img", "--out", str(small_disk / "out"),
               "--shard_size", "4", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {small_disk / 'out'}/shard-000007.tar cannot be " \
        "written (No space left on device): choose a writable folder with room for it."
    left = sorted(p.name for p in (small_disk / "out").iterdir())
    assert not [name for name in left if name.endswith(".partial")]
    if "sizes.json" in left:
        assert sorted(json.loads((small_disk / "out" / "sizes.json").read_text())) == \
            [name for name in left if name.endswith(".tar")]
    else:
        assert left == []


# 5. Runs side by side.

def _ensure(folder: str, barrier) -> str:
    from multimodal.data.shards import ensure_synthetic
    from multimodal.errors import UserError

    barrier.wait()
    try:
        ensure_synthetic(Path(folder), num_samples=48, shard_size=4, image_size=32)
        return "ok"
    except UserError as exc:
        return str(exc)


def test_runs_side_by_side_share_one_set_of_synthetic_scenes(tmp_path):
    context = multiprocessing.get_context("fork")  # the parent's imports: no second torch import per process
    with context.Manager() as manager, context.Pool(3) as pool:
        for round in range(4):
            folder = tmp_path / f"round-{round}"
            barrier = manager.Barrier(3)
            assert pool.starmap(_ensure, [(str(folder), barrier)] * 3) == ["ok"] * 3
            sizes = json.loads((folder / "sizes.json").read_text())
            assert sizes == {f"shard-{i:06d}.tar": 4 for i in range(12)}
            assert sum(1 for _ in read_records(expand_urls(str(folder)))) == 48
            assert not list(folder.glob("*.partial")) and not list(folder.glob(".*.partial"))


def test_synthetic_scenes_a_stopped_run_left_half_written_are_written_again(tmp_path, monkeypatch):
    from multimodal.data import synthetic
    from multimodal.data.shards import ensure_synthetic

    scene = synthetic.scene

    def stopped(i, **kwargs):
        if i == 6:
            raise KeyboardInterrupt  # a run stopped in its second shard
        return scene(i, **kwargs)

    monkeypatch.setattr(synthetic, "scene", stopped)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "d", num_samples=8, shard_size=4, image_size=32)
    (tmp_path / "d" / ".shard-000001.tar.1234-0123abcd.partial").write_bytes(b"torn")  # as SIGKILL leaves it
    monkeypatch.setattr(synthetic, "scene", scene)
    assert ensure_synthetic(tmp_path / "d", num_samples=8, shard_size=4, image_size=32)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        ".synthetic.lock", "shard-000000.tar", "shard-000001.tar", "sizes.json", "synthetic.json"]
    assert sum(1 for _ in read_records(expand_urls(str(tmp_path / "d")))) == 8
