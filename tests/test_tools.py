"""search (with contact sheets) and plot through the CLI."""

from pathlib import Path

import pytest
from PIL import Image

from multimodal.data.shards import write_synthetic


@pytest.fixture(scope="module")
def index(trained, tmp_path_factory) -> Path:
    from multimodal.cli import main

    root = tmp_path_factory.mktemp("index")
    write_synthetic(root / "shards", num_samples=24, shard_size=8)
    assert main(["embed", "--checkpoint", str(trained[0]), "--shards", str(root / "shards"), "--out",
                 str(root / "emb"), "--num_workers", "0"]) == 0
    return root / "emb"


def test_text_search_prints_matches_and_draws_a_contact_sheet(cli, index, tmp_path):
    proc = cli("search", "--index", str(index), "--text", "a large red circle on the left", "--k", "5",
               "--grid", str(tmp_path / "grid.png"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 5
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    with Image.open(tmp_path / "grid.png") as sheet:
        assert sheet.width > 5 * 100 and sheet.height > 100
        # The tiles hold the scenes' pixels, not empty placeholders: some are far from white.
        assert min(sheet.convert("L").getdata()) < 100


def test_image_query_finds_itself_first(cli, index, tmp_path):
    image = tmp_path / "q.png"
    from multimodal.eval.embed import load_folder
    from multimodal.eval.search import load_images

    emb = load_folder(index)
    load_images(emb, [3])[0].save(image)
    proc = cli("search", "--index", str(index), "--image", str(image), "--k", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = next(line for line in proc.stdout.splitlines() if line.strip().startswith("1 "))
    assert emb.image_rows[3]["key"] in first
    proc = cli("search", "--index", str(index), "--target", "texts", "--text", "three green triangles",
               cwd=tmp_path)
    assert proc.returncode == 0 and len([x for x in proc.stdout.splitlines() if x.strip()[:1].isdigit()]) == 8


def test_search_bad_input(cli, index, tmp_path):
    for args, expected in ((["--text", "x", "--image", "y.png"], "exactly one query"),
                           (["--image", str(tmp_path / "none.png")], "does not exist"),
                           (["--text", "x", "--k", "0"], "--k must be")):
        proc = cli("search", "--index", str(index), *args, cwd=tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_plot_draws_the_curves(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = ["epoch,step,train/loss,train/logit_scale,train/lr,val/loss,val/image_retrieval_recall@5"]
    for step in range(0, 50, 5):
        lines.append(f"0,{step},{4 - step / 20},{14 + step / 10},{1e-3},,")
        if step % 20 == 0:
            lines.append(f"0,{step},,,,{4.2 - step / 25},{step / 60}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    proc = cli("plot", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(run / "curves.png") as png:
        assert png.width > 800
    proc = cli("plot", str(tmp_path / "nothing"), cwd=tmp_path)
    assert proc.returncode == 2 and "No metrics.csv" in proc.stderr
