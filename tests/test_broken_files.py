"""Every command over a table of broken or misplaced files: one sentence naming the file, exit
status 2, no traceback, and nothing the user had is lost.

Each case builds its own broken input in a temporary folder and runs `multimodal.cli.main` in this
process, as the console script does.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")
DIM = 128  # the tiny model's embedding size
LATIN1_CAPTION = "caf\xe9 au lait on a table".encode("latin-1")


def image_file(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (200, 30, 30)).save(path)
    return path


def embedding_folder(root: Path, *, info: str | None = None, npy: bytes | None = None,
                     index: str | None = None) -> Path:
    """A one-part embedding folder of two images and their captions, as `multimodal embed --shards`
    writes it for the tiny model, with one file replaced by the broken one given."""
    folder = root / "emb"
    for sub in ("img_emb", "img_index", "text_emb", "text_index"):
        (folder / sub).mkdir(parents=True)
    (folder / "info.json").write_text(info if info is not None else json.dumps(
        {"model": "tiny", "checkpoint": str(root / "none.ckpt"), "dim": DIM, "dtype": "float32"}))
    good = root / "good.npy"
    np.save(good, np.eye(2, DIM, dtype=np.float32))
    (folder / "img_emb" / "part-00000.npy").write_bytes(npy if npy is not None else good.read_bytes())
    (folder / "img_index" / "part-00000.jsonl").write_text(
        index if index is not None else '{"key": "a"}\n{"key": "b"}\n')
    (folder / "text_emb" / "part-00000.npy").write_bytes(good.read_bytes())
    (folder / "text_index" / "part-00000.jsonl").write_text(
        '{"key": "a", "caption": "one", "image": 0}\n{"key": "b", "caption": "two", "image": 1}\n')
    return folder


def truncated_npy(root: Path) -> bytes:
    np.save(root / "full.npy", np.ones((2, DIM), np.float32))
    return (root / "full.npy").read_bytes()[:-10]


def shard_folder(root: Path, sizes: str) -> Path:
    from multimodal.data.shards import write_synthetic

    write_synthetic(root / "shards", num_samples=8, shard_size=4)
    (root / "shards" / "sizes.json").write_text(sizes)
    return root / "shards"


def latin1_csv(root: Path) -> list[str]:
    image_file(root / "images" / "a.png")
    (root / "captions.csv").write_bytes(b"image,caption\na.png," + LATIN1_CAPTION + b"\n")
    return ["shards", "csv", "--csv", str(root / "captions.csv"), "--images", str(root / "images"),
            "--out", str(root / "out")]


def latin1_texts(root: Path, ckpt: Path) -> list[str]:
    (root / "texts.txt").write_bytes(LATIN1_CAPTION + b"\n")
    return ["embed", "--checkpoint", str(ckpt), "--texts", str(root / "texts.txt"), "--out", str(root / "emb"),
            "--num_workers", "0"]


def latin1_classnames(root: Path, ckpt: Path) -> list[str]:
    image_file(root / "images" / "cafe" / "a.png")
    (root / "classes.txt").write_bytes(LATIN1_CAPTION + b"\n")
    return ["eval", "zeroshot", "--checkpoint", str(ckpt), "--images", str(root / "images"),
            "--classnames", str(root / "classes.txt")]


def shards_out_is_a_file(root: Path) -> list[str]:
    image_file(root / "images" / "a.png")
    (root / "captions.csv").write_text("image,caption\na.png,a red square\n")
    (root / "out").write_text("a file the user keeps")
    return ["shards", "csv", "--csv", str(root / "captions.csv"), "--images", str(root / "images"),
            "--out", str(root / "out")]


def shards_out_holds_other_files(root: Path) -> list[str]:
    image_file(root / "images" / "a.png")
    (root / "captions.csv").write_text("image,caption\na.png,a red square\n")
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("a file the user keeps")
    return ["shards", "csv", "--csv", str(root / "captions.csv"), "--images", str(root / "images"),
            "--out", str(root / "out")]


def embed_out_is_a_file(root: Path, ckpt: Path) -> list[str]:
    (root / "texts.txt").write_text("a dog\n")
    (root / "out").write_text("a file the user keeps")
    return ["embed", "--checkpoint", str(ckpt), "--texts", str(root / "texts.txt"), "--out", str(root / "out")]


def eval_out_is_a_folder(root: Path) -> list[str]:
    (root / "result").mkdir()
    (root / "result" / "keep.txt").write_text("a file the user keeps")
    folder = embedding_folder(root)
    return ["eval", "retrieval", "--embeddings", str(folder), "--out", str(root / "result")]


def search_grid_with_unknown_format(root: Path, ckpt: Path) -> list[str]:
    folder = embedding_folder(root, info=json.dumps({"model": "tiny", "checkpoint": str(ckpt), "dim": DIM}))
    return ["search", "--index", str(folder), "--text", "a dog", "--grid", str(root / "out.xyz")]


def search_image_that_is_not_one(root: Path, ckpt: Path) -> list[str]:
    folder = embedding_folder(root, info=json.dumps({"model": "tiny", "checkpoint": str(ckpt), "dim": DIM}))
    (root / "query.png").write_text("not an image at all")
    return ["search", "--index", str(folder), "--image", str(root / "query.png")]


def export_under_a_file(root: Path, ckpt: Path) -> list[str]:
    (root / "folder").write_text("a file, not a folder")
    return ["export", "--checkpoint", str(ckpt), "--out", str(root / "folder" / "model.safetensors")]


def export_into_read_only_folder(root: Path, ckpt: Path) -> list[str]:
    (root / "ro").mkdir()
    os.chmod(root / "ro", 0o555)
    return ["export", "--checkpoint", str(ckpt), "--out", str(root / "ro" / "model.safetensors")]


def zero_byte_ckpt(root: Path) -> list[str]:
    (root / "empty.ckpt").write_bytes(b"")
    return ["export", "--checkpoint", str(root / "empty.ckpt"), "--out", str(root / "m.safetensors")]


def resume_state_dict(root: Path, ckpt: Path) -> list[str]:
    from multimodal.weights import load_model

    model = load_model(ckpt)
    torch.save(model.towers.state_dict(), root / "towers.ckpt")
    return ["train", "--config", DEBUG, "--resume", str(root / "towers.ckpt")]


def resume_other_architecture(root: Path, ckpt: Path) -> list[str]:
    """A Lightning checkpoint of the tiny model resumed by a run of another architecture."""
    config = root / "wide.json"
    tiny = json.loads((REPO / "configs" / "models" / "tiny.json").read_text())
    tiny["embed_dim"] = 32
    config.write_text(json.dumps(tiny))
    return ["train", "--config", DEBUG, "--model.model_name", str(config), "--resume", str(ckpt)]


def plot_garbage(root: Path) -> list[str]:
    (root / "metrics.csv").write_text("epoch,step,train/loss\n0,5,3.2\n0,ten,x7\n\x00\x01,,\n")
    return ["plot", str(root / "metrics.csv")]


BROKEN = {
    # (make arguments from (tmp folder, trained checkpoint), what the sentence must say)
    "latin-1 csv for shards": (lambda t, c: latin1_csv(t), "captions.csv is not UTF-8"),
    "latin-1 texts for embed": (latin1_texts, "texts.txt is not UTF-8"),
    "latin-1 class names for zeroshot": (latin1_classnames, "classes.txt is not UTF-8"),
    "shards --out is a file": (lambda t, c: shards_out_is_a_file(t), "is a file, not a folder"),
    "shards --out holds other files": (lambda t, c: shards_out_holds_other_files(t), "holds other files"),
    "embed --out is a file": (embed_out_is_a_file, "is a file, not a folder"),
    "eval --out is a folder": (lambda t, c: eval_out_is_a_folder(t), "is a folder"),
    "search --grid of an unknown format": (search_grid_with_unknown_format, "must end in .png"),
    "search --image that is not an image": (search_image_that_is_not_one, "query.png cannot be read as an image"),
    "export under a file": (export_under_a_file, "folder"),
    "export of a zero-byte checkpoint": (lambda t, c: zero_byte_ckpt(t), "empty.ckpt is empty"),
    "truncated npy part": (lambda t, c: ["eval", "retrieval", "--embeddings",
                                         str(embedding_folder(t, npy=truncated_npy(t)))], "part-00000.npy"),
    "npy part that is not npy": (lambda t, c: ["eval", "retrieval", "--embeddings",
                                               str(embedding_folder(t, npy=b"garbage"))], "part-00000.npy"),
    "malformed jsonl index": (lambda t, c: ["eval", "retrieval", "--embeddings",
                                            str(embedding_folder(t, index='{"key": "a"}\n{"key": \n'))],
                              "part-00000.jsonl"),
    "jsonl index of non-objects": (lambda t, c: ["eval", "retrieval", "--embeddings",
                                                 str(embedding_folder(t, index="1\n2\n"))], "part-00000.jsonl"),
    "malformed info.json for search": (lambda t, c: ["search", "--index", str(embedding_folder(t, info="{model")),
                                                     "--text", "a dog"], "info.json"),
    "info.json without a model": (lambda t, c: ["search", "--index", str(embedding_folder(t, info="[1, 2]")),
                                                "--text", "a dog"], "info.json"),
    "malformed sizes.json": (lambda t, c: ["embed", "--checkpoint", str(c), "--shards",
                                           str(shard_folder(t, "{shard")), "--out", str(t / "emb")], "sizes.json"),
    "string-valued sizes.json": (lambda t, c: ["embed", "--checkpoint", str(c), "--shards",
                                               str(shard_folder(t, '{"shard-000000.tar": "four"}')),
                                               "--out", str(t / "emb")], "sizes.json"),
    "resume of a state dict": (resume_state_dict, "towers.ckpt"),
    "resume of another architecture": (resume_other_architecture, "does not match"),
    "plot of garbage rows": (lambda t, c: plot_garbage(t), "metrics.csv"),
}

if os.geteuid() != 0:  # root writes into read-only folders
    BROKEN["export into a read-only folder"] = (export_into_read_only_folder, "is not writable")


@pytest.mark.parametrize("case", BROKEN)
def test_broken_file_is_one_sentence_and_exit_2(case, trained, tmp_path, capsys, monkeypatch):
    from multimodal.cli import main

    make_args, expected = BROKEN[case]
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path, trained[0])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = main(args)
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, stderr[-2000:]
    assert last.count(". ") <= 2, last  # a sentence, not a dump
    for path, content in before.items():  # nothing the user had is changed or gone
        assert path.is_file() and path.read_bytes() == content, path


def test_a_write_the_disk_refuses_is_one_sentence(trained, tmp_path, capsys, monkeypatch):
    """A read-only mount or a full disk, found only when writing (root passes the permission checks)."""
    import errno

    from multimodal import files
    from multimodal.cli import main

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(files, "open", refuse, raising=False)  # every write goes through files.atomic_file
    assert main(["export", "--checkpoint", str(trained[0]), "--out", str(tmp_path / "m.safetensors")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "m.safetensors cannot be written (Read-only file system)" in last and not list(tmp_path.iterdir())
