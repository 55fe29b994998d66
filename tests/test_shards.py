"""Shard writers: COCO and CSV sources read back whole, deterministic, with failures reported."""

import csv
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from multimodal.data.captionfiles import read_coco_entries
from multimodal.data.decode import decode_image
from multimodal.data.formats import expand_urls, read_records
from multimodal.data.shards import write_coco, write_csv
from multimodal.errors import UserError


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def read_back(folder: Path) -> dict[str, tuple[Image.Image, list[str]]]:
    return {r.key: (decode_image(r.data), r.captions) for r in read_records(expand_urls(str(folder)))}


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_mini_round_trip(coco_mini, tmp_path, split):
    captions_json = coco_mini / "annotations" / f"captions_{split}.json"
    report = write_coco(captions_json, coco_mini / split, tmp_path / "shards", shard_size=32)
    coco = json.loads(captions_json.read_text())
    expected = {}
    for ann in coco["annotations"]:
        expected.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    assert report.failures == []
    assert report.num_samples == len(expected) == len(coco["images"])
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(expected) and max(sizes.values()) == 32
    samples = read_back(tmp_path / "shards")
    assert {int(k) for k in samples} == set(expected)
    by_id = {im["id"]: im for im in coco["images"]}
    for key, (image, captions) in samples.items():
        image_id = int(key)
        assert sorted(captions) == sorted(expected[image_id])
        assert image.size == (by_id[image_id]["width"], by_id[image_id]["height"])
    # Originals are stored byte for byte when no downscaling is asked for.
    first = sorted(expected)[0]
    original = (coco_mini / split / by_id[first]["file_name"]).read_bytes()
    with (tmp_path / "shards" / "shard-000000.tar").open("rb") as f:
        assert original in f.read()


def test_coco_downscale_is_deterministic(coco_mini, tmp_path):
    args = (coco_mini / "annotations" / "captions_train2017.json", coco_mini / "train2017")
    write_coco(*args, tmp_path / "a", shard_size=25, max_side=96, workers=2)
    write_coco(*args, tmp_path / "b", shard_size=25, max_side=96, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    samples = read_back(tmp_path / "a")
    assert len(samples) == 80
    assert all(max(image.size) == 96 for image, _ in samples.values())


def make_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40 + i, 30), (i * 20 % 255, 100, 50)).save(folder / name)


def test_csv_groups_rows_per_image_and_reports_unreadable(tmp_path):
    make_images(tmp_path / "img", ["a.jpg", "b.png", "c.jpg"])
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not an image at all")
    rows = [("a.jpg", "a cat"), ("b.png", "a dog"), ("a.jpg", "a small cat"), ("broken.jpg", "nothing"),
            ("missing.jpg", "gone"), ("c.jpg", "a bird"), ("c.jpg", " ")]
    with (tmp_path / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    report = write_csv(tmp_path / "captions.csv", tmp_path / "img", tmp_path / "out", shard_size=2)
    assert sorted(name for name, _ in report.failures) == ["broken.jpg", "missing.jpg"]
    samples = read_back(tmp_path / "out")
    assert sorted(sorted(c) for _, c in samples.values()) == [["a bird"], ["a cat", "a small cat"], ["a dog"]]
    assert report.sizes == {"shard-000000.tar": 2, "shard-000001.tar": 1}


def test_flickr_csv_round_trip(flickr, tmp_path):
    report = write_csv(flickr / "captions.txt", flickr / "images", tmp_path / "out", shard_size=300)
    assert report.failures == [] and report.num_samples == 1000
    samples = read_back(tmp_path / "out")
    assert len(samples) == 1000 and all(len(c) == 5 for _, c in samples.values())


def test_existing_output_needs_overwrite(tmp_path):
    make_images(tmp_path / "img", ["a.jpg"])
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,one\n")
    write_csv(tmp_path / "c.csv", tmp_path / "img", tmp_path / "out")
    with pytest.raises(UserError, match="pass overwrite to replace them"):
        write_csv(tmp_path / "c.csv", tmp_path / "img", tmp_path / "out")
    assert (tmp_path / "out" / "shard-000000.tar").is_file()  # nothing lost
    write_csv(tmp_path / "c.csv", tmp_path / "img", tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("content,match", [
    ('{"images": []}', "lacks the COCO keys"),
    ('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}', "without the COCO field"),
    ("not json", "not valid JSON"),
])
def test_bad_coco_json(tmp_path, content, match):
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(UserError, match=match):
        read_coco_entries(tmp_path / "c.json")
