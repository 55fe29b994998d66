"""`multimodal shards karpathy`: the Karpathy split files (dataset_coco.json, dataset_flickr30k.json)
as retrieval test shards, every image with all its captions, and `eval retrieval` counting them all."""

import csv
import json
from pathlib import Path

import pytest

from multimodal.data.formats import expand_urls, read_records

# Splits by position among the val2017 images: a mix in file order, as dataset_coco.json interleaves
# test, val and restval among the val2014 images; every train2017 image is `train`.
VAL_SPLITS = ("test", "val", "restval")
MISSING = "000000999999.jpg"


def sentences(captions: list[str], imgid: int, first_sentid: int) -> list[dict]:
    return [{"raw": f" {c} ", "tokens": c.lower().split(), "imgid": imgid, "sentid": first_sentid + j}
            for j, c in enumerate(captions)]


def coco_karpathy(coco_mini: Path, path: Path, per_folder: int = 18) -> dict:
    """A dataset_coco.json of the first `per_folder` images of val2017 and train2017 and one image that
    is not on disk. Every fourth image keeps 4 of its captions: the real counts are not always 5."""
    images: list[dict] = []
    for folder in ("val2017", "train2017"):
        coco = json.loads((coco_mini / "annotations" / f"captions_{folder}.json").read_text())
        captions: dict[int, list[str]] = {}
        for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
        for n, im in enumerate(sorted(coco["images"], key=lambda im: im["id"])[:per_folder]):
            i = len(images)
            kept = captions[im["id"]][:4 if i % 4 == 3 else None]
            images.append({"filepath": folder, "filename": im["file_name"], "imgid": i, "cocoid": im["id"],
                           "split": VAL_SPLITS[n % 3] if folder == "val2017" else "train",
                           "sentences": sentences(kept, i, 5 * i), "sentids": list(range(5 * i, 5 * i + len(kept)))})
    images.insert(4, {"filepath": "val2017", "filename": MISSING, "cocoid": 999999, "split": "test",
                      "sentences": sentences(["a photo that is not there"], 0, 999), "sentids": [999]})
    for i, im in enumerate(images):  # `imgid` is the position in the file, as in the published files
        im["imgid"] = i
        for s in im["sentences"]:
            s["imgid"] = i
    data = {"dataset": "coco", "images": images}
    path.write_text(json.dumps(data))
    return data


def flickr_karpathy(flickr: Path, path: Path, num_images: int = 20) -> dict:
    """A dataset_flickr8k.json (no `filepath`) of the first `num_images` images of captions.txt."""
    captions: dict[str, list[str]] = {}
    with (flickr / "captions.txt").open(newline="") as f:
        for row in csv.DictReader(f):
            if len(captions) < num_images or row["image"] in captions:
                captions.setdefault(row["image"], []).append(row["caption"])
    images = [{"filename": name, "imgid": i, "split": ("train", "test", "val", "train")[i % 4],
               "sentences": sentences(caps, i, 5 * i), "sentids": list(range(5 * i, 5 * i + len(caps)))}
              for i, (name, caps) in enumerate(captions.items())]
    data = {"dataset": "flickr8k", "images": images}
    path.write_text(json.dumps(data))
    return data


def expected(data: dict, splits: tuple[str, ...]) -> dict[str, tuple[dict, list[str]]]:
    """key -> (Karpathy entry, stripped captions) of the images on disk in `splits`, in file order."""
    return {f"{i:09d}": (im, [s["raw"].strip() for s in im["sentences"]])
            for i, im in enumerate(data["images"]) if im["split"] in splits and im["filename"] != MISSING}


def counts(data: dict, split: str) -> tuple[int, int]:
    chosen = expected(data, (split,)).values()
    return len(chosen), sum(len(captions) for _, captions in chosen)


def read_back(folder: Path) -> list[tuple[str, list[str], dict]]:
    return [(r.key, r.captions, r.meta) for r in read_records(expand_urls(str(folder)))]


def shards(cli, json_path: Path, images: Path, out: Path, *splits: str):
    return cli("shards", "karpathy", "--json", str(json_path), "--images", str(images), "--out", str(out),
               *(["--split", *splits] if splits else []), "--shard_size", "10", "--max_side", "64",
               "--num_workers", "2", cwd=out.parent)


def test_coco_splits_with_all_their_captions_in_file_order(cli, coco_mini, tmp_path):
    data = coco_karpathy(coco_mini, tmp_path / "dataset_coco.json")
    splits = ("test", "val", "restval", "train")
    proc = shards(cli, tmp_path / "dataset_coco.json", coco_mini, tmp_path / "out", *splits)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = expected(data, splits)
    assert len(want) == 36
    assert f"Wrote 36 samples in 4 shards to {tmp_path / 'out'}" in proc.stdout
    for split in splits:
        images, captions = counts(data, split)
        assert f"; {split}: {images} images, {captions} captions" in proc.stdout
    assert f"could not read val2017/{MISSING}: FileNotFoundError" in proc.stderr
    assert f"1 images could not be read (listed above), 1 of them missing from {coco_mini}." in proc.stdout

    samples = read_back(tmp_path / "out")
    assert [key for key, _, _ in samples] == list(want)
    for key, captions, record in samples:
        image, want_captions = want[key]
        assert captions == record["captions"] == want_captions  # all of them, in order, stripped
        assert {k: record[k] for k in ("split", "filename", "imgid", "cocoid")} == \
            {k: image[k] for k in ("split", "filename", "imgid", "cocoid")}
        assert record["file_name"] == f"{image['filepath']}/{image['filename']}" and max(
            record["width"], record["height"]) == 64
    assert {len(c) for _, c, _ in samples} == {4, 5}
    assert sum(json.loads((tmp_path / "out" / "sizes.json").read_text()).values()) == 36


def test_coco_test_split_from_the_image_folder_itself(cli, coco_mini, tmp_path):
    """`--images val2014/` rather than the folder holding it: `filename` is found without `filepath`."""
    data = coco_karpathy(coco_mini, tmp_path / "dataset_coco.json")
    proc = shards(cli, tmp_path / "dataset_coco.json", coco_mini / "val2017", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, captions = counts(data, "test")
    assert (images, captions) == (6, 28)
    assert f"Wrote 6 samples in 1 shards to {tmp_path / 'out'}; test: 6 images, 28 captions; 1 images" in proc.stdout
    samples = read_back(tmp_path / "out")
    assert {record["split"] for _, _, record in samples} == {"test"}
    assert [record["file_name"] for _, _, record in samples] == [
        im["filename"] for im, _ in expected(data, ("test",)).values()]


def test_flickr_file_without_filepath(cli, flickr, tmp_path):
    data = flickr_karpathy(flickr, tmp_path / "dataset_flickr8k.json")
    proc = shards(cli, tmp_path / "dataset_flickr8k.json", flickr / "images", tmp_path / "out", "val", "test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not read" not in proc.stderr
    assert f"Wrote 10 samples in 1 shards to {tmp_path / 'out'}; val: 5 images, 25 captions; " \
           "test: 5 images, 25 captions." in proc.stdout
    want = expected(data, ("val", "test"))
    samples = read_back(tmp_path / "out")
    assert [(key, captions) for key, captions, _ in samples] == [(k, c) for k, (_, c) in want.items()]
    assert all(record["file_name"] == record["filename"] and "cocoid" not in record for _, _, record in samples)


def coco_file(t: Path, coco_mini: Path) -> Path:
    coco_karpathy(coco_mini, t / "dataset_coco.json")
    return t / "dataset_coco.json"


def not_a_list(t: Path, coco_mini: Path) -> Path:
    (t / "list.json").write_text('[{"split": "test"}]')
    return t / "list.json"


def no_images(t: Path, coco_mini: Path) -> Path:
    (t / "none.json").write_text('{"dataset": "coco", "images": 3}')
    return t / "none.json"


def no_sentences(t: Path, coco_mini: Path) -> Path:
    (t / "bare.json").write_text('{"images": [{"filename": "a.jpg", "split": "test"}]}')
    return t / "bare.json"


def malformed(t: Path, coco_mini: Path) -> Path:
    (t / "odd.json").write_text('{"images": [["a.jpg", "test"]]}')
    return t / "odd.json"


BAD_INPUTS = {
    "a COCO captions file": (lambda t, c: c / "annotations" / "captions_val2017.json", [],
                             "is not a Karpathy split file (image 0 has no field 'split'"),
    "a JSON list": (not_a_list, [], "holds a JSON list where a JSON object belongs"),
    "no images list": (no_images, [], "is not a Karpathy split file (it has no 'images' list)"),
    "entries without sentences": (no_sentences, [], "(image 0 has no field 'sentences'"),
    "entries that are not objects": (malformed, [], "(image 0 is not laid out as one"),
    "a split it does not have": (coco_file, ["--split", "tset"],
                                 "has no image in split 'tset'; its splits are test (7 images), val (6 images), "
                                 "restval (6 images), train (18 images): pass one of them with --split."),
    "one of two splits it does not have": (coco_file, ["--split", "test", "testing"],
                                           "has no image in split 'testing'; its splits are"),
    "a missing file": (lambda t, c: t / "dataset_coco.json", [], "Karpathy split file"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_sentence(cli, coco_mini, tmp_path, case):
    make, extra, sentence = BAD_INPUTS[case]
    proc = cli("shards", "karpathy", "--json", str(make(tmp_path, coco_mini)), "--images", str(coco_mini),
               "--out", str(tmp_path / "out"), *extra, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and sentence in last, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_missing_image_folder(cli, coco_mini, tmp_path):
    coco_karpathy(coco_mini, tmp_path / "dataset_coco.json")
    proc = shards(cli, tmp_path / "dataset_coco.json", tmp_path / "val2014", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: Image folder {tmp_path / 'val2014'} does not exist: pass the folder that holds the images "
        "with --images.")


def test_retrieval_counts_every_image_and_caption_of_the_split(cli, coco_mini, tmp_path):
    """CLIP_benchmark's counting: text->image over every caption, image->text over every image."""
    from multimodal import arch, weights
    from multimodal.model import create_model

    data = coco_karpathy(coco_mini, tmp_path / "dataset_coco.json")
    assert shards(cli, tmp_path / "dataset_coco.json", coco_mini, tmp_path / "test").returncode == 0
    weights.export(create_model(arch.load("tiny")), tmp_path / "tiny.safetensors")  # untrained: counts only
    proc = cli("eval", "retrieval", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--model", "tiny",
               "--shards", str(tmp_path / "test"), "--batch_size", "4", "--num_workers", "0",
               "--out", str(tmp_path / "result.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["num_images"], result["num_texts"]) == counts(data, "test") == (6, 28)
    assert "Retrieval over 6 images and 28 captions" in proc.stdout
