"""The training loop learns: memorising real COCO photos, and the demo's held-out synthetic scenes."""

import json

import pytest
import pytorch_lightning as pl

from multimodal.data.datamodule import ShardDataModule
from multimodal.data.shards import write_coco
from multimodal.eval.embed import embed_shards
from multimodal.eval.retrieval import chance_recall, retrieval_metrics
from multimodal.module import CLIPModule
from tests.conftest import run_cli


@pytest.mark.slow
def test_tiny_model_memorises_coco_mini(coco_mini, tmp_path):
    shards = tmp_path / "shards"
    write_coco(coco_mini / "annotations" / "captions_train2017.json", coco_mini / "train2017", shards,
               shard_size=20, max_side=96)
    pl.seed_everything(0)
    module = CLIPModule("tiny", lr=1e-3, weight_decay=0.0, warmup_steps=20)
    data = ShardDataModule(str(shards), batch_size=40, num_workers=2, shuffle_buffer=80)
    trainer = pl.Trainer(accelerator="cpu", max_steps=250, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)

    emb = embed_shards(module.model, "tiny", str(shards), progress=False)
    assert emb.image_features.shape[0] == 80 and emb.text_features.shape[0] >= 400
    metrics = retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image)
    chance = chance_recall(80, 1)
    print(json.dumps(metrics, indent=1))
    assert metrics["image_retrieval_recall@1"] > 20 * chance
    assert metrics["text_retrieval_recall@1"] > 20 * chance


@pytest.mark.slow
def test_demo_learns_composition_of_held_out_scenes(tmp_path):
    proc = run_cli("demo", "--trainer.max_steps", "150", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "demo" / "version_0" / "retrieval.json").read_text())
    assert result["num_images"] == 500
    assert result["image_retrieval_recall@5"] >= 10 * chance_recall(500, 5)
    assert "recall@5 is" in proc.stdout
    run = tmp_path / "runs" / "demo" / "version_0"
    assert "recall@5 is" in (run / "retrieval.txt").read_text()
    for name in ("curves.png", "retrieval.png"):
        assert (run / name).stat().st_size > 10_000, name
