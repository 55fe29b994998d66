"""Results people can compare: CLIP_benchmark's JSON layout, a CSV table a row a run, curves over steps."""

import csv
import json

import torch

from multimodal.eval import results


def test_a_table_grows_by_one_row_a_run_and_new_metrics_become_columns(tmp_path):
    table = tmp_path / "results.csv"
    results.append_row(table, results.result("zeroshot_retrieval", "mscoco_captions", "ViT-B-32", "laion2b_s34b_b79k",
                                             {"image_retrieval_recall@5": 0.5}, step=None))
    results.append_row(table, results.result("zeroshot_classification", "cifar10", "tiny", "runs/x/last.ckpt",
                                             {"acc1": 0.25, "acc5": 0.75}, step=40, num_images=20))
    rows = list(csv.DictReader(table.open()))
    assert [r["dataset"] for r in rows] == ["mscoco_captions", "cifar10"]
    assert rows[0]["image_retrieval_recall@5"] == "0.5" and rows[0]["acc1"] == "" and rows[0]["step"] == ""
    assert rows[1]["acc5"] == "0.75" and rows[1]["step"] == "40" and rows[1]["image_retrieval_recall@5"] == ""
    assert list(rows[0])[:5] == ["dataset", "model", "pretrained", "task", "language"]


def test_a_sweep_over_checkpoints_becomes_one_table_and_one_plot(cli, trained, tmp_path):
    from multimodal.data.shards import write_synthetic

    ckpt, _ = trained
    write_synthetic(tmp_path / "coco-test", num_samples=24, shard_size=12)
    later = torch.load(ckpt, weights_only=True)
    later["global_step"] = 30
    torch.save(later, tmp_path / "step30.ckpt")
    for i, checkpoint in enumerate((ckpt, tmp_path / "step30.ckpt")):
        proc = cli("eval", "retrieval", "--checkpoint", str(checkpoint), "--shards", str(tmp_path / "coco-test"),
                   "--dataset", "mscoco_captions", "--num_workers", "0", "--out", f"evals/{i}.json",
                   "--out-table", "sweep.csv", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads((tmp_path / "evals" / "0.json").read_text())
    assert list(first)[:6] == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert first["dataset"] == "mscoco_captions" and first["step"] == 3
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["step"] for r in rows] == ["3", "30"]
    assert rows[0]["image_retrieval_recall@5"] == str(first["metrics"]["image_retrieval_recall@5"])
    proc = cli("plot", "evals", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "evals" / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plotting_a_folder_without_results_is_one_sentence(cli, tmp_path):
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "other.json").write_text('{"something": 1}')
    proc = cli("plot", "evals", cwd=tmp_path)
    assert proc.returncode == 2 and "holds no evaluation results" in proc.stderr
    assert proc.stderr.count("\n") == 1
