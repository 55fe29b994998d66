"""Shard sets as users bring them: img2dataset's output and CLIP_benchmark's webdataset benchmarks, built
from real photos in exactly their layouts, read by training, `embed` and `eval`; what their members mean
(`decode.Members`); and the sentences their inconsistencies get."""

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multimodal.data.decode import Members
from multimodal.data.formats import open_shards, read_records
from multimodal.data.pixels import TrainCrop
from multimodal.errors import UserError
from tests.conftest import REPO
from tests.layouts import (
    flickr_photos,
    keyword_classes,
    write_clip_benchmark_classification,
    write_clip_benchmark_retrieval,
    write_img2dataset,
)

DEBUG = str(REPO / "configs" / "debug.yaml")
def one_sentence(stderr: str) -> str:
    """The one `error:` line a refused command prints (progress bars aside), or '' if there is not exactly one."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]
    return lines[0] if len(lines) == 1 and "Traceback" not in stderr else ""


RECAPTION = {"caption_blip": lambda captions: f"a photo: {captions[1]}", "captions_all": lambda captions: captions}


@pytest.fixture(scope="module")
def img2dataset(tmp_path_factory, flickr):
    """60 Flickr8k photos downloaded by img2dataset in shards of 16 URLs, every 7th URL failed (52 samples),
    each sample's json with a recaption (a string) and all five captions (a list)."""
    folder = tmp_path_factory.mktemp("img2dataset") / "flickr"
    photos = flickr_photos(flickr, 60)
    write_img2dataset(folder, photos, per_shard=16, failed_every=7, extra=RECAPTION)
    return folder, photos


def test_img2dataset_counts_come_from_its_stats_files(img2dataset):
    folder, photos = img2dataset
    shards = open_shards(str(folder), verify=True)
    assert [u.rsplit("/", 1)[1] for u in shards.urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert shards.sizes == [14, 14, 14, 10] and shards.num_samples == 52 == 60 - 60 // 7
    assert [r.captions for r in read_records(shards.urls)][:2] == [[photos[0][2][0]], [photos[1][2][0]]]
    assert read_records(shards.urls).__next__().meta["url"] == f"https://example.org/{photos[0][0]}"


@pytest.mark.parametrize("members,expected", [
    (Members(), lambda c: [c[0]]),  # img2dataset's txt: its caption
    (Members(caption_field=("caption_blip",)), lambda c: [f"a photo: {c[1]}"]),  # a recaptioned set's field
    (Members(caption_field=("caption", "caption_blip")), lambda c: [c[0], f"a photo: {c[1]}"]),  # pooled
    (Members(caption_field=("captions_all",)), lambda c: c),  # a field holding a list
    (Members(text_key="txt", caption_field=("caption_blip",)), lambda c: [c[0], f"a photo: {c[1]}"]),
])
def test_the_chosen_members_give_the_captions(img2dataset, members, expected):
    folder, photos = img2dataset
    by_url = {f"https://example.org/{name}": captions for name, _, captions in photos}
    records = list(read_records(open_shards(str(folder)).urls, members))
    assert len(records) == 52 and all(r.captions == expected(by_url[r.meta["url"]]) for r in records)


def test_training_reads_img2dataset_shards_with_a_recaption(img2dataset, cli, tmp_path):
    """No sizes.json and no data.num_samples: an epoch is the stats files' 52 samples, 3 batches of 16."""
    from multimodal.data.datamodule import ShardDataModule

    folder, _ = img2dataset
    data = ShardDataModule(str(folder), batch_size=16, num_workers=0, caption_field="caption_blip")
    assert len(data.train_dataloader()) == 3
    result = cli("train", "--config", DEBUG, "--data.train_shards", str(folder), "--data.synthetic", "null",
                 "--data.val_shards", "null", "--data.caption_field", "caption_blip", "--data.batch_size", "16",
                 "--data.num_workers", "0", "--trainer.max_steps", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import torch

    state = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert state["global_step"] == 4


def test_embed_and_eval_read_the_chosen_caption_field(img2dataset, cli, trained, tmp_path):
    folder, _ = img2dataset
    ckpt, _ = trained
    result = cli("eval", "retrieval", "--checkpoint", str(ckpt), "--shards", str(folder), "--caption_field",
                 "captions_all", "--num_workers", "0", "--out", str(tmp_path / "r.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert (record["num_images"], record["num_texts"]) == (52, 260) and record["dataset"] == "flickr"
    result = cli("embed", "--checkpoint", str(ckpt), "--shards", str(folder), "--text_key", "txt", "--num_workers", "0",
                 "--out", str(tmp_path / "emb"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for p in sorted((tmp_path / "emb" / "text_index").glob("*.jsonl"))
            for line in p.read_text().splitlines()]
    assert len(rows) == 52


def broken_copy(img2dataset, tmp_path, *, stats=None, parquet_rows=None, drop_sample=False):
    folder, _ = img2dataset
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    if stats is not None:
        path = copy / "00001_stats.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **stats}))
    if parquet_rows is not None:
        table = pq.read_table(copy / "00001.parquet").to_pylist()
        pq.write_table(pa.Table.from_pylist(parquet_rows(table)), copy / "00001.parquet")
    if drop_sample:  # the tar holds one sample fewer than both files say
        import webdataset as wds

        from multimodal.data.tario import tarfile_samples

        samples = list(tarfile_samples([str(copy / "00001.tar")], handler=wds.reraise_exception))[1:]
        with wds.TarWriter(str(copy / "00001.tar")) as writer:
            for s in samples:
                writer.write({k: v for k, v in s.items() if k != "__url__"})
    return copy


@pytest.mark.parametrize("break_it,sentence", [
    (dict(stats={"successes": 15}), "lists 14 successful samples but 00001_stats.json says 15"),
    (dict(parquet_rows=lambda rows: rows[:-2]), "lists 12 successful samples but 00001_stats.json says 14"),
    (dict(drop_sample=True), "holds 13 samples but 00001_stats.json says 14"),
    (dict(stats={"successes": "many"}), "has no sample count ('successes')"),
])
def test_stats_or_parquet_that_do_not_match_their_tar_are_refused(img2dataset, cli, trained, tmp_path, break_it,
                                                                   sentence):
    broken = broken_copy(img2dataset, tmp_path, **break_it)
    ckpt, _ = trained
    out = tmp_path / "out.json"
    result = cli("eval", "retrieval", "--checkpoint", str(ckpt), "--shards", str(broken), "--num_workers", "0",
                 "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2 and sentence in one_sentence(result.stderr), result.stderr
    assert not out.exists()


@pytest.mark.parametrize("option,value,sentence", [
    ("--text_key", "txt2", "has no 'txt2' member (it has jpg, json, txt): set --text_key"),
    ("--caption_field", "caption_coca", "has no field 'caption_coca' (it has caption, caption_blip"),
    ("--image_key", "webp", "has no 'webp' member"),
])
def test_a_chosen_member_no_sample_has_is_one_sentence(img2dataset, cli, trained, tmp_path, option, value, sentence):
    folder, _ = img2dataset
    ckpt, _ = trained
    result = cli("embed", "--checkpoint", str(ckpt), "--shards", str(folder), option, value, "--out",
                 str(tmp_path / "emb"), cwd=tmp_path)
    assert result.returncode == 2 and sentence in result.stderr, result.stderr
    assert not (tmp_path / "emb").exists()


def test_a_missing_text_key_in_training_is_one_sentence(img2dataset, cli, tmp_path):
    folder, _ = img2dataset
    result = cli("train", "--config", DEBUG, "--data.train_shards", str(folder), "--data.synthetic", "null",
                 "--data.val_shards", "null", "--data.text_key", "txt2", cwd=tmp_path)
    assert result.returncode == 2 and "set data.text_key to one of them" in result.stderr, result.stderr


def test_a_sample_without_the_chosen_member_is_a_bad_sample_of_its_kind(img2dataset, tmp_path):
    """The first sample has the chosen json field, later ones may not: they are counted as captionless."""
    import webdataset as wds

    from multimodal import arch
    from multimodal.data.pipeline import ImageTextStream
    from tests.test_pipeline import batches

    folder, _ = img2dataset
    url = str(folder / "00000.tar")
    samples = []
    for raw in wds.tarfile_samples([{"url": url}]):
        meta = json.loads(raw["json"])
        if len(samples) % 2:
            del meta["caption_blip"]
        samples.append({"__key__": raw["__key__"], "jpg": raw["jpg"], "json": json.dumps(meta)})
    with wds.TarWriter(str(tmp_path / "half.tar")) as writer:
        for s in samples:
            writer.write(s)
    tiny = arch.load("tiny")
    stream = ImageTextStream([[str(tmp_path / "half.tar")]], crop=TrainCrop.of(tiny.preprocessing),
                             tokenizer=tiny.tokenizer, batch_size=7, num_batches=1, shuffle_buffer=0,
                             members=Members(caption_field=("caption_blip",)))
    [batch] = batches(stream)
    assert len(batch) == 7 and batch.bad == {"no caption": 6} and batch.read == 13


@pytest.fixture(scope="module")
def benchmark_retrieval(tmp_path_factory, flickr):
    """A CLIP_benchmark retrieval dataset of 40 Flickr8k photos (webp, five captions each, shards of 16),
    written by CLIP_benchmark's converter into a folder named as its published copies are."""
    root = tmp_path_factory.mktemp("cb") / "wds_flickr8k"
    return write_clip_benchmark_retrieval(root, flickr_photos(flickr, 40), max_count=16)


@pytest.fixture(scope="module")
def benchmark_classification(tmp_path_factory, flickr):
    """A CLIP_benchmark classification dataset of Flickr8k photos labelled dog, child or person by their first
    caption, train (60 photos) and test (45) splits, classnames.txt and {c} templates."""
    root = tmp_path_factory.mktemp("cb") / "wds_flickr_people"
    for split, start, count in (("train", 100, 60), ("test", 0, 45)):
        images, classes = keyword_classes(flickr_photos(flickr, count, start))
        write_clip_benchmark_classification(root, images, classes, ["a photo of a {c}.", "a picture of the {c}."],
                                            split=split, max_count=20)
    return root


def test_clip_benchmark_retrieval_layout_is_read_as_clip_benchmark_reads_it(benchmark_retrieval):
    shards = open_shards(str(benchmark_retrieval))
    assert shards.benchmark.name == "wds/flickr8k" and shards.benchmark.task == "retrieval"
    assert [u.rsplit("/", 2)[1:] for u in shards.urls] == [["test", "0.tar"], ["test", "1.tar"], ["test", "2.tar"]]
    assert shards.members.caption_lines and shards.num_samples is None
    assert open_shards(str(benchmark_retrieval / "test")).urls == shards.urls  # the split folder names it too
    records = list(read_records(shards.urls, shards.members))
    assert len(records) == 40 and all(len(r.captions) == 5 for r in records)


def test_eval_retrieval_counts_every_caption_of_a_clip_benchmark_dataset(benchmark_retrieval, cli, trained, tmp_path):
    ckpt, _ = trained
    result = cli("eval", "retrieval", "--checkpoint", str(ckpt), "--dataset_root", str(benchmark_retrieval),
                 "--split", "test", "--num_workers", "0", "--out", str(tmp_path / "r.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["dataset"] == "wds/flickr8k" and record["task"] == "zeroshot_retrieval"
    assert (record["num_images"], record["num_texts"]) == (40, 200)


def test_eval_zeroshot_takes_a_clip_benchmark_datasets_classes_and_templates(benchmark_classification, cli, trained,
                                                                             tmp_path):
    ckpt, _ = trained
    shards = open_shards(str(benchmark_classification))
    assert shards.benchmark.classnames == ("dog", "child", "person")
    assert shards.benchmark.templates == ("a photo of a {c}.", "a picture of the {c}.")
    result = cli("eval", "zeroshot", "--checkpoint", str(ckpt), "--shards", str(benchmark_classification),
                 "--num_workers", "0", "--out", str(tmp_path / "z.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "z.json").read_text())
    assert record["dataset"] == "wds/flickr_people" and record["num_images"] == 45 and record["num_classes"] == 3
    assert "(2 templates)" in result.stdout


def test_clip_benchmark_folder_faults_are_one_sentence(benchmark_classification, benchmark_retrieval, cli, trained,
                                                       tmp_path):
    ckpt, _ = trained
    no_count = tmp_path / "wds_nocount"
    shutil.copytree(benchmark_classification, no_count)
    (no_count / "test" / "nshards.txt").unlink()
    fewer = tmp_path / "wds_fewer"
    shutil.copytree(benchmark_classification, fewer)
    (fewer / "classnames.txt").write_text("dog\nchild\n")
    cases = [
        (["zeroshot", "--shards", str(no_count)], "has no test/nshards.txt, the file that counts a split's shards "
                                                   "(splits found: train)"),
        (["zeroshot", "--shards", str(fewer)], "A sample has class 2, outside the 2 class names given"),
        (["zeroshot", "--shards", str(benchmark_classification), "--split", "val"], "has no val/nshards.txt"),
        (["retrieval", "--shards", str(benchmark_classification)], "is a CLIP_benchmark classification dataset"),
        (["zeroshot", "--shards", str(benchmark_retrieval)], "is a CLIP_benchmark retrieval dataset"),
    ]
    for args, sentence in cases:
        out = tmp_path / "out.json"
        result = cli("eval", *args, "--checkpoint", str(ckpt), "--num_workers", "0", "--out", str(out), cwd=tmp_path)
        assert result.returncode == 2 and sentence in one_sentence(result.stderr), (args, result.stderr)
        assert not out.exists()


@pytest.mark.parametrize("text,expected", [
    ("a photo of a {c}.", "a photo of a {}."),
    ("a photo of a {}.", "a photo of a {}."),
    ("a {c} beside a {}.", None),
    ("a photo of a {c} {x}.", None),
    ("a photo {", None),
    ("no place for it.", None),
])
def test_templates_take_either_placeholder_and_nothing_else(text, expected):
    from multimodal.eval.zeroshot import template

    if expected is None:
        with pytest.raises(UserError, match="must hold the class name's place once"):
            template(text, "t.txt")
    else:
        assert template(text, "t.txt") == expected


def test_training_on_a_clip_benchmark_retrieval_split_takes_one_caption_a_line(benchmark_retrieval):
    """Each training sample's caption is one of its image's five, tokenised alone: never the five joined."""
    from multimodal.data.datamodule import ShardDataModule

    data = ShardDataModule(str(benchmark_retrieval / "test"), batch_size=8, num_workers=0, shuffle_buffer=0,
                           num_samples=40)  # a CLIP_benchmark split counts its shards, not its samples
    tokenizer = data.arch.tokenizer
    captions = {r.key: r.captions for r in read_records(open_shards(str(benchmark_retrieval)).urls,
                                                         Members(caption_lines=True))}
    batches = list(data.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        for key, tokens in zip(batch.keys, batch.text):
            assert any(tokenizer([c])[0].equal(tokens) for c in captions[key]), key


def test_a_clip_benchmark_folder_is_not_joined_with_other_shards_or_read_as_another_split(
        benchmark_retrieval, benchmark_classification, img2dataset, cli, trained, tmp_path):
    folder, _ = img2dataset
    with pytest.raises(UserError, match="give it alone, not joined with other shards"):
        open_shards(f"{benchmark_retrieval}::{folder}")
    with pytest.raises(UserError, match="is the test split of a CLIP_benchmark dataset: to read its train split"):
        open_shards(str(benchmark_classification / "test"), split="train")
    ckpt, _ = trained
    result = cli("eval", "linear_probe", "--checkpoint", str(ckpt), "--shards", str(benchmark_classification / "test"),
                 "--num_workers", "0", cwd=tmp_path)
    assert result.returncode == 2 and "to read its train split, name the dataset's folder" in \
        one_sentence(result.stderr), result.stderr


def test_a_linear_probe_on_class_folders_that_differ_is_one_sentence(cli, trained, tmp_path):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "cow"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / split / name / "0.jpg")
    ckpt, _ = trained
    result = cli("eval", "linear_probe", "--checkpoint", str(ckpt), "--train_images", str(tmp_path / "train"),
                 "--images", str(tmp_path / "test"), "--num_workers", "0", cwd=tmp_path)
    assert result.returncode == 2 and "have different class folders (cow, dog in one only)" in \
        one_sentence(result.stderr), result.stderr


def test_callbacks_take_clip_benchmark_folders_with_their_names_and_classes(benchmark_classification,
                                                                         benchmark_retrieval):
    from multimodal.eval.callbacks import RetrievalCallback, ZeroShotCallback

    zeroshot = ZeroShotCallback(shards=str(benchmark_classification))
    assert zeroshot.dataset == "wds/flickr_people" and zeroshot.classnames == ["dog", "child", "person"]
    assert zeroshot.templates == ["a photo of a {}.", "a picture of the {}."]
    assert RetrievalCallback(str(benchmark_retrieval)).dataset == "wds/flickr8k"
