"""Our figures against CLIP_benchmark's own, on the same shards and the same weights.

The shards are CLIP_benchmark webdataset datasets written by its own converter from real Flickr8k photos;
the weights are a tiny model trained for a few steps and exported as open_clip weights, which CLIP_benchmark
loads through open_clip; its `zeroshot_retrieval`, `zeroshot_classification` and `linear_probe` evaluations
run here, on the CPU, next to `multimodal eval`.

- `--preprocess open_clip` (PIL decoding, open_clip's eval transform): equal, but for rank ties that the
  order of floating-point sums can flip. Each test counts the near-ties (scores within 1e-5 of the k-th
  one) and allows at most that many flips.
- the fast default (DCT-scaled decode, torch's resize): pixels within a few levels of open_clip's
  (tests/test_decode.py), which moves a near-random model's recall by up to RECALL_TOLERANCE and its
  accuracy by up to ACCURACY_TOLERANCE, measured here on these 40 and 60 photos (see the printed figures).
"""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.layouts import (
    flickr_photos,
    keyword_classes,
    write_clip_benchmark_classification,
    write_clip_benchmark_retrieval,
)

KS = (1, 5, 10)
# measured (pytest tests/test_benchmarks.py -s): fast vs open_clip preprocessing, on these sets and weights
RECALL_TOLERANCE = 0.05  # absolute recall@k: 2 of 40 images, 10 of 200 captions
ACCURACY_TOLERANCE = 0.05  # absolute acc1/acc5: 3 of 60 images
NEAR = 1e-5  # scores this close to the k-th are ties that float order may flip


@pytest.fixture(scope="module")
def flickr_trained(tmp_path_factory, flickr):
    """The tiny model after 60 steps of 64 on the 280 Flickr8k photos the tests evaluate on (all five captions
    each): enough to tell them apart, so that a difference in any image's features would show in the figures."""
    import pytorch_lightning as pl

    from multimodal.data.datamodule import ShardDataModule
    from multimodal.data.shards import write_csv
    from multimodal.recipe import build_module

    root = tmp_path_factory.mktemp("flickr_trained")
    lines = (flickr / "captions.txt").read_text(encoding="utf-8").splitlines()
    used = {name for name, _, _ in flickr_photos(flickr, 280, start=200)}
    (root / "used.csv").write_text("\n".join([lines[0], *(row for row in lines[1:] if row.split(",")[0] in used)]))
    write_csv(root / "used.csv", flickr / "images", root / "shards", shard_size=70, max_side=96)
    pl.seed_everything(0)
    module = build_module("tiny", lr=2e-3, warmup_steps=5, count_flops=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, datamodule=ShardDataModule(str(root / "shards"), batch_size=64, num_workers=1))
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", module


@pytest.fixture(scope="module")
def open_clip_model(flickr_trained, tmp_path_factory):
    """(checkpoint, the same weights exported and loaded by open_clip, its eval transform, tokenizer)."""
    import open_clip

    from multimodal.weights import export

    ckpt, module = flickr_trained
    folder = tmp_path_factory.mktemp("exported")
    written = export(module.model, folder / "model.safetensors")
    open_clip.add_model_config(str(written[1]))
    model, _, preprocess = open_clip.create_model_and_transforms(written[1].stem, pretrained=str(written[0]))
    return ckpt, model.eval(), preprocess, open_clip.get_tokenizer(written[1].stem)


@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory, flickr):
    root = tmp_path_factory.mktemp("cb") / "wds_flickr8k"
    return write_clip_benchmark_retrieval(root, flickr_photos(flickr, 40, start=200), max_count=16)


@pytest.fixture(scope="module")
def classification_root(tmp_path_factory, flickr):
    """Six classes (so that acc5 means something), train and test splits of 80 and 60 photos."""
    root = tmp_path_factory.mktemp("cb") / "wds_flickr_scenes"
    for split, start, count in (("train", 400, 80), ("test", 300, 60)):
        images, classes = keyword_classes(flickr_photos(flickr, count, start), many=True)
        write_clip_benchmark_classification(root, images, classes, ["a photo of a {c}.", "a blurry photo of the {c}."],
                                            split=split, max_count=25)
    return root


def their_loader(root, dataset: str, preprocess, split: str = "test", task: str = "zeroshot_classification"):
    from clip_benchmark.datasets.builder import build_dataset

    data = build_dataset(f"wds/{dataset}", root=str(root), transform=preprocess, split=split, task=task)
    return torch.utils.data.DataLoader(data.batched(16), batch_size=None, num_workers=0), data


def ours(cli, tmp_path, task: str, *args: str) -> dict:
    out = tmp_path / f"{task}-{len(list(tmp_path.glob('*.json')))}.json"
    result = cli("eval", task, *args, "--num_workers", "0", "--batch_size", "16", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def near_ties(scores: torch.Tensor, k: int) -> int:
    """Rows whose k-th and (k+1)-th best scores lie within NEAR: the order of a float sum may swap them,
    and with them a hit at k (recall@k, top-k accuracy)."""
    top = scores.topk(k + 1, dim=1).values
    return int((top[:, k - 1] - top[:, k] < NEAR).sum())


def test_retrieval_equals_clip_benchmarks(retrieval_root, open_clip_model, cli, tmp_path):
    from clip_benchmark.metrics import zeroshot_retrieval

    ckpt, model, preprocess, tokenizer = open_clip_model
    loader, _ = their_loader(retrieval_root, "flickr8k", preprocess, task="zeroshot_retrieval")
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=list(KS))
    exact = ours(cli, tmp_path, "retrieval", "--checkpoint", str(ckpt), "--shards", str(retrieval_root),
                 "--preprocess", "open_clip")
    fast = ours(cli, tmp_path, "retrieval", "--checkpoint", str(ckpt), "--shards", str(retrieval_root))
    assert exact["dataset"] == "wds/flickr8k" and (exact["num_images"], exact["num_texts"]) == (40, 200)

    images, texts, owner = [], [], []
    with torch.no_grad():
        for batch_images, batch_texts in loader:
            for captions in batch_texts:
                owner.extend([len(images)] * len(captions))
                images.append(None)
                texts.append(F.normalize(model.encode_text(tokenizer(captions)), dim=-1))
            images[-len(batch_texts):] = F.normalize(model.encode_image(batch_images), dim=-1).unbind()
    scores = torch.cat(texts) @ torch.stack(images).T  # (200, 40)
    worst = 0.0
    for k in KS:
        ties = {"image": near_ties(scores, k), "text": near_ties(scores.T, k)}
        for kind, count in (("image", 200), ("text", 40)):
            key = f"{kind}_retrieval_recall@{k}"
            assert abs(exact["metrics"][key] - theirs[key]) * count <= ties[kind], (key, exact["metrics"][key],
                                                                                    theirs[key], ties)
            worst = max(worst, abs(fast["metrics"][key] - theirs[key]))
            assert abs(fast["metrics"][key] - theirs[key]) <= RECALL_TOLERANCE, (key, fast["metrics"][key], theirs[key])
    flips = sum(exact["metrics"][k] != theirs[k] for k in theirs)
    print(f"\nretrieval: open_clip preprocessing equal in {len(theirs) - flips} of {len(theirs)} figures; "
          f"fast preprocessing at most {worst:.3f} from CLIP_benchmark's ({theirs})")


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's `accuracy`, but `.item()` where it calls float() on an array of shape (1,), which
    NumPy 2.4 refuses (the arithmetic is its own)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0).item() / len(target) for k in topk]


def test_zeroshot_classification_equals_clip_benchmarks(classification_root, open_clip_model, cli, tmp_path,
                                                        monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    ckpt, model, preprocess, tokenizer = open_clip_model
    loader, data = their_loader(classification_root, "flickr_scenes", preprocess)
    loader.dataset.classes = data.classes  # CLIP_benchmark reads the class count from its loader's dataset
    theirs = zeroshot_classification.evaluate(model, loader, tokenizer, data.classes, data.templates, "cpu",
                                              amp=False)
    exact = ours(cli, tmp_path, "zeroshot", "--checkpoint", str(ckpt), "--shards", str(classification_root),
                 "--preprocess", "open_clip")
    fast = ours(cli, tmp_path, "zeroshot", "--checkpoint", str(ckpt), "--shards", str(classification_root))
    assert exact["dataset"] == "wds/flickr_scenes" and exact["num_images"] == 60 and exact["num_classes"] == 6
    with torch.no_grad():  # near-ties between the best and the second-best class, and the 5th and the 6th
        classifier = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer(
            [t.format(c=c) for t in data.templates])), dim=-1).mean(0), dim=-1) for c in data.classes])
        logits = torch.cat([F.normalize(model.encode_image(images), dim=-1) @ classifier.T for images, _ in loader])
    ties = {k: near_ties(logits, k) for k in (1, 5)}
    for key, k in (("acc1", 1), ("acc5", 5), ("mean_per_class_recall", 1)):
        assert abs(exact["metrics"][key] - theirs[key]) * 60 <= ties[k] * (6 if key.startswith("mean") else 1), \
            (key, exact["metrics"][key], theirs[key], ties)
        assert abs(fast["metrics"][key] - theirs[key]) <= ACCURACY_TOLERANCE * (2 if key.startswith("mean") else 1)
    print(f"\nzero-shot: ours (open_clip preprocessing) {exact['metrics']}, fast {fast['metrics']}, "
          f"CLIP_benchmark {theirs}; near-ties {ties}")


def test_linear_probe_equals_clip_benchmarks_on_the_same_features(classification_root, open_clip_model, cli,
                                                                  tmp_path):
    """`eval linear_probe` with open_clip's preprocessing: the features CLIP_benchmark's Featurizer makes of its
    own loaders, probed as CLIP_benchmark probes them (`tests/test_linear_probe.py` shows the probe is its
    probe, digit for digit), give our figures."""
    from multimodal.eval.linear_probe import probe

    ckpt, model, preprocess, _ = open_clip_model
    features = {}
    with torch.no_grad():
        for split in ("train", "test"):
            loader, _ = their_loader(classification_root, "flickr_scenes", preprocess, split)
            pairs = [(model.encode_image(images), labels) for images, labels in loader]
            features[split] = torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])
    settings = {"epochs": 5, "seed": 0, "val_proportion": 0.2}
    expected = probe(*features["train"], *features["test"], **settings, batch_size=16)
    result = ours(cli, tmp_path, "linear_probe", "--checkpoint", str(ckpt), "--shards", str(classification_root),
                  "--preprocess", "open_clip", "--epochs", "5", "--seed", "0", "--val_proportion", "0.2")
    assert result["task"] == "linear_probe" and result["dataset"] == "wds/flickr_scenes"
    # measured: the same batches of 16 give the same features to the last bit, so the same probe
    assert str(result["metrics"]) == str(expected), (result["metrics"], expected)
    print(f"\nlinear probe: ours {result['metrics']}, on CLIP_benchmark's loaders' features {expected}")
