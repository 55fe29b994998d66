"""The training loop learns: memorising real COCO photos, and retrieval of the demo's held-out synthetic
scenes (CoCa's captions: tests/test_learning_coca.py)."""

import json

import pytest
import pytorch_lightning as pl
import torch

from multimodal import arch
from multimodal.data.datamodule import ShardDataModule
from multimodal.data.decode import decode_image
from multimodal.data.formats import expand_urls, read_records
from multimodal.data.shards import write_coco
from multimodal.eval.embed import embed_shards
from multimodal.eval.retrieval import chance_recall, retrieval_metrics
from multimodal.recipe import build_module
from tests.conftest import open_clip_transforms


@pytest.mark.slow
def test_tiny_model_memorises_coco_mini(coco_mini, tmp_path):
    shards = tmp_path / "shards"
    write_coco(coco_mini / "annotations" / "captions_train2017.json", coco_mini / "train2017", shards,
               shard_size=20, max_side=96)
    pl.seed_everything(0)
    module = build_module("tiny", lr=1e-3, weight_decay=0.0, warmup_steps=20)
    data = ShardDataModule(str(shards), batch_size=40, num_workers=2, shuffle_buffer=80)
    trainer = pl.Trainer(accelerator="cpu", max_steps=250, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)

    emb = embed_shards(module.model, str(shards), progress=False)
    assert emb.image_features.shape[0] == 80 and emb.text_features.shape[0] >= 400
    metrics = retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image)
    chance = chance_recall(80, 1)
    print(json.dumps(metrics, indent=1))
    assert metrics["image_retrieval_recall@1"] > 20 * chance
    assert metrics["text_retrieval_recall@1"] > 20 * chance

    # The same photos at full size (640 x 480): our evaluation decodes them at a reduced DCT scale
    # and resizes with torch; open_clip's eval transform takes the whole PIL image. Same recall.
    full = tmp_path / "full"
    write_coco(coco_mini / "annotations" / "captions_train2017.json", coco_mini / "train2017", full, shard_size=20)
    fast = embed_shards(module.model, str(full), progress=False)
    ours = retrieval_metrics(fast.image_features, fast.text_features, fast.text_to_image)
    # And decoded where they are encoded (`--decode gpu`; on this CPU run, by the same code in this process).
    device = embed_shards(module.model, str(full), progress=False, decode="gpu")
    on_device = retrieval_metrics(device.image_features, device.text_features, device.text_to_image)
    theirs = open_clip_recall(module.model, "tiny", str(full))
    print(json.dumps({"ours": ours, "ours_decoded_on_device": on_device, "open_clip_transform": theirs}, indent=1))
    for key in (k for k in theirs if "recall@" in k):
        assert abs(ours[key] - theirs[key]) <= RECALL_TOLERANCE, key
        assert abs(on_device[key] - theirs[key]) <= RECALL_TOLERANCE, key


RECALL_TOLERANCE = 0.02  # absolute, on 80 images and 400 captions: 8 captions or 1.6 images


@torch.no_grad()
def open_clip_recall(model, name: str, spec: str) -> dict[str, float]:
    """Recall with open_clip's own eval transform on full-size PIL images: the reference."""
    architecture = arch.load(name)
    transform, tokenizer = open_clip_transforms(architecture)[1], architecture.tokenizer
    images, captions, text_to_image = [], [], []
    for record in read_records(expand_urls(spec)):
        images.append(transform(decode_image(record.data)))
        captions.extend(record.captions)
        text_to_image.extend([len(images) - 1] * len(record.captions))
    model = model.eval()
    return retrieval_metrics(model.encode_image(torch.stack(images)), model.encode_text(tokenizer(captions)),
                             torch.tensor(text_to_image))


@pytest.mark.slow
def test_demo_learns_composition_of_held_out_scenes(cli, tmp_path):
    # 80 of the config's 400 steps (measured: text -> image recall@5 54x chance; at 100 steps 61x)
    proc = cli("demo", "--trainer.max_steps", "80", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "demo" / "version_0" / "retrieval.json").read_text())
    assert result["num_images"] == 500
    assert result["image_retrieval_recall@5"] >= 10 * chance_recall(500, 5)
    assert "recall@5 is" in proc.stdout
    run = tmp_path / "runs" / "demo" / "version_0"
    assert "recall@5 is" in (run / "retrieval.txt").read_text()
    for name in ("curves.png", "retrieval.png"):
        assert (run / name).stat().st_size > 10_000, name
