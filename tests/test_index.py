"""`multimodal index` and `search --index INDEX` (issue 24): the IVF-PQ path forced by a small memory budget on
a few thousand clustered vectors the test writes as an embedding folder; recall@10 against exact search,
the CLI's search through an index and through the embedding folder, shards built from --parts and merged
searching as one build, and bad input refused in one sentence with nothing half-written."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal.errors import UserError

DIM, COUNT, PARTS = 128, 4000, 4  # the tiny model's embedding size: its text queries search these vectors
BUDGET = "1MB"  # an exact index of 4,000 128-d vectors takes 2 MB: this forces IVF-PQ
QUERY = "a large red circle"  # the folder has a cluster around its embedding (a query of random vectors finds
# nothing in particular: near-equal scores that no approximate index ranks as exact search does)


def write_folder(root: Path, checkpoint: Path, count: int = COUNT, dim: int = DIM, parts: int = PARTS,
                 seed: int = 0, near: np.ndarray | None = None) -> Path:
    """An embedding folder as `multimodal embed` writes one: unit float16 vectors around 40 centres, in parts;
    the first centre in the direction `near` where given (a query's: its cluster is what it finds)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    if near is not None:
        centres[0] = near / np.linalg.norm(near) * np.sqrt(dim)
    x = centres[rng.integers(0, 40, count)] + 0.6 * rng.standard_normal((count, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for sub in ("img_emb", "img_index"):
        (root / sub).mkdir(parents=True)
    start = 0
    for part, chunk in enumerate(np.array_split(x, parts)):
        np.save(root / "img_emb" / f"part-{part:05d}.npy", chunk.astype(np.float16))
        rows = "".join(json.dumps({"key": f"{start + i:06d}", "caption": f"vector {start + i}"}) + "\n"
                       for i in range(len(chunk)))
        (root / "img_index" / f"part-{part:05d}.jsonl").write_text(rows)
        start += len(chunk)
    info = {"model": "tiny", "checkpoint": str(checkpoint.resolve()), "dtype": "float16", "dim": dim,
            "part_size": count // parts, "source": {"images": "synthetic"}}
    (root / "info.json").write_text(json.dumps(info))
    return root


def vectors(folder: Path) -> np.ndarray:
    """The folder's vectors, float32, unit length (as stored in float16, a little off)."""
    x = np.concatenate([np.load(p).astype(np.float32) for p in sorted((folder / "img_emb").glob("*.npy"))])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def queries(folder: Path, count: int = 200, seed: int = 5) -> np.ndarray:
    x = vectors(folder)
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), count, replace=False)] + rng.standard_normal((count, x.shape[1])) * 0.05
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def built(trained, tmp_path_factory):
    """(embedding folder, its index) of the trained tiny model's name, through the CLI."""
    from multimodal.cli import main
    from multimodal.weights import load_model

    root = tmp_path_factory.mktemp("index")
    model = load_model(trained[0])
    with torch.no_grad():
        query = model.encode_text(model.architecture.tokenizer([QUERY]))[0].numpy()
    emb = write_folder(root / "emb", trained[0], near=query)
    assert main(["index", str(emb), "--out", str(root / "idx"), "--max_index_memory", BUDGET]) == 0
    return emb, root / "idx"


def test_the_index_is_ivf_pq_within_its_budget_and_finds_the_exact_neighbours(built):
    from multimodal.eval.index import open_index, parse_memory

    emb, idx = built
    info = json.loads((idx / "info.json").read_text())
    assert info["factory"] == "IVF64,PQ32x4fs" and info["rerank"] >= 100  # few lists: searched exactly
    assert info["count"] == COUNT and info["dim"] == DIM and info["kind"] == "image" and info["model"] == "tiny"
    assert info["recall@10"] >= 0.95 and 1 <= info["nprobe"] <= 64 and info["efSearch"] == 0
    assert (idx / "index.faiss").stat().st_size <= parse_memory(BUDGET)
    # The re-ranking stage: the parts' float16 rows, byte for byte, in a file faiss maps.
    from multimodal.eval import vectors as stage

    stored = stage.rows(idx / "vectors.faiss", DIM)
    parts = np.concatenate([np.load(p) for p in sorted((emb / "img_emb").glob("*.npy"))])
    assert stored.shape == (COUNT, DIM) and np.array_equal(stored, parts)
    assert stage.read(idx / "vectors.faiss").ntotal == COUNT
    searcher, _ = open_index(idx)
    q, x = queries(emb), vectors(emb)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    scores, rows = searcher.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
    assert recall >= 0.9, recall
    # The scores are exact cosines (of the float16 rows re-ranked), best first.
    assert np.allclose(scores, np.take_along_axis(q @ x.T, rows, 1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_many_lists_get_an_hnsw_coarse_quantiser_searched_as_well(built, tmp_path, monkeypatch):
    from multimodal.eval import index as module

    emb, idx = built
    monkeypatch.setattr(module, "FLAT_COARSE_MAX", 0)
    info = module.build_index(emb, tmp_path / "hnsw", module.parse_memory(BUDGET), log=lambda line: None)
    assert info["factory"] == "IVF64_HNSW32,PQ32x4fs" and info["efSearch"] >= info["nprobe"] >= 1
    assert info["recall@10"] >= 0.95
    q = queries(emb, seed=3)
    (s1, r1), (s2, r2) = module.open_index(idx)[0].search(q, 5), module.open_index(tmp_path / "hnsw")[0].search(q, 5)
    assert np.mean(r1 == r2) >= 0.9 and np.allclose(s1[r1 == r2], s2[r1 == r2])


def test_the_stage_stores_rows_of_other_lengths_normalised(tmp_path):
    from multimodal.eval import vectors as stage

    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    with stage.writing(tmp_path / "v.faiss", 16, 300) as write:
        write(x[:100])
        write(x[100:])
    stored = stage.rows(tmp_path / "v.faiss", 16).astype(np.float32)
    assert np.allclose(stored, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-3)
    assert np.allclose(stage.read(tmp_path / "v.faiss").reconstruct(7), stored[7])
    with pytest.raises(RuntimeError, match="299 rows written of the 300"), \
            stage.writing(tmp_path / "short.faiss", 16, 300) as write:
        write(x[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.faiss"]


def test_search_through_the_index_and_through_the_embedding_folder(cli, built, tmp_path):
    emb, idx = built

    def hits(folder: Path) -> list[tuple[str, float]]:
        proc = cli("search", "--index", str(folder), "--text", QUERY, "--k", "5", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
        return [(line[2], float(line[1])) for line in lines]

    approximate, exact = hits(idx), hits(emb)
    assert approximate == exact  # the same rows, with the same (exact) scores
    proc = cli("search", "--index", str(idx), "--text", "a dog", "--k", "2", cwd=tmp_path)
    assert "vector " in proc.stdout  # rows named by their index entries (key, caption)


def test_shards_of_parts_merged_search_as_one_build(cli, built, tmp_path):
    from multimodal.eval.index import open_index

    emb, idx = built
    for parts in ("0:1", "1:"):
        proc = cli("index", str(emb), "--out", f"shard-{parts[0]}", "--parts", parts, "--max_index_memory", BUDGET,
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "shard-1" / "info.json").read_text())["count"] == COUNT * 3 // PARTS
    proc = cli("index", "--merge", "shard-1", "shard-0", "--out", "merged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, merged = json.loads((idx / "info.json").read_text()), json.loads((tmp_path / "merged/info.json").read_text())
    assert {k: merged[k] for k in ("count", "nprobe", "recall@10", "held")} == \
        {k: one[k] for k in ("count", "nprobe", "recall@10", "held")}
    q = queries(emb, seed=9)
    (s1, r1), (s2, r2) = open_index(idx)[0].search(q, 10), open_index(tmp_path / "merged")[0].search(q, 10)
    assert np.array_equal(r1, r2) and np.array_equal(s1, s2)
    proc = cli("index", "--merge", "shard-0", "merged", "--out", "twice", cwd=tmp_path)
    assert proc.returncode == 2 and "same parts twice" in proc.stderr


def test_exact_pieces_merge_too_and_a_piece_alone_names_the_folders_rows(tmp_path):
    from multimodal.eval.index import build_index, merge_indexes, open_index, parse_memory

    (tmp_path / "model.ckpt").write_bytes(b"named, not read")
    emb = write_folder(tmp_path / "emb", tmp_path / "model.ckpt", count=2000, parts=4)
    quiet = lambda line: None  # noqa: E731
    build_index(emb, tmp_path / "one", parse_memory("64MB"), log=quiet)
    build_index(emb, tmp_path / "a", parse_memory("64MB"), parts=(0, 1), log=quiet)
    build_index(emb, tmp_path / "b", parse_memory("64MB"), parts=(1, None), log=quiet)
    info = merge_indexes([tmp_path / "b", tmp_path / "a"], tmp_path / "merged", log=quiet)
    assert info["factory"] == "IDMap,Flat" and info["held"] == [[0, 4]]
    q = queries(emb, 50)
    (s1, r1), (s2, r2) = open_index(tmp_path / "one")[0].search(q, 10), open_index(tmp_path / "merged")[0].search(q, 10)
    assert np.array_equal(r1, r2) and np.allclose(s1, s2)
    rows = open_index(tmp_path / "b")[0].search(q, 5)[1]
    assert (rows >= 500).all()  # parts 1: hold the folder's rows 500 on


def refused(proc, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and all(e in proc.stderr for e in expected), proc.stderr


def test_bad_input_is_one_sentence_and_nothing_half_written(cli, built, trained, tmp_path):
    emb, idx = built

    def index(folder: Path, *more: str, out: str = "out"):
        proc = cli("index", str(folder), "--out", out, "--max_index_memory", BUDGET, *more, cwd=tmp_path)
        assert not (tmp_path / out).exists() or out == "taken"
        assert not list(tmp_path.glob(".*partial"))
        return proc

    mixed = write_folder(tmp_path / "mixed", trained[0], count=600, parts=2)
    np.save(mixed / "img_emb" / "part-00001.npy", np.ones((300, 64), np.float16))
    refused(index(mixed), "mixes embedding sizes [64, 128]")
    short = write_folder(tmp_path / "short", trained[0], count=600, parts=2)
    data = (short / "img_emb" / "part-00001.npy").read_bytes()
    (short / "img_emb" / "part-00001.npy").write_bytes(data[:len(data) // 2])
    refused(index(short), "part-00001.npy is cut short", "promises 300 rows")
    refused(index(emb, "--max_index_memory", "50KB"), "smallest index", "more than --max_index_memory")
    refused(index(emb, "--max_index_memory", "lots"), "--max_index_memory must be a size")
    refused(index(emb, "--parts", "7:9"), "holds none of the 4 parts")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("a file the user keeps")
    refused(index(emb, out="taken"), "--out taken exists")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "a file the user keeps"
    other = tmp_path / "other.ckpt"
    shutil.copy(trained[0], other)
    refused(cli("search", "--index", str(idx), "--text", "a dog", "--checkpoint", str(other), cwd=tmp_path),
            "holds embeddings of model tiny", f"not of --checkpoint {other}")
    refused(cli("search", "--index", str(idx), "--text", "a dog", "--target", "texts", cwd=tmp_path),
            "holds images, not texts")
    refused(cli("index", "--merge", str(idx), "--out", "m", "--parts", "0:1", cwd=tmp_path), "--parts and --kind")
    older = tmp_path / "older"
    shutil.copytree(idx, older)
    info = json.loads((older / "info.json").read_text())
    (older / "info.json").write_text(json.dumps({k: v for k, v in info.items() if k != "layout"}))
    refused(cli("search", "--index", str(older), "--text", "a dog", cwd=tmp_path), "built by an earlier version")
    cut = tmp_path / "cut"
    shutil.copytree(idx, cut)
    data = (cut / "vectors.faiss").read_bytes()
    (cut / "vectors.faiss").write_bytes(data[:len(data) // 2])
    refused(cli("search", "--index", str(cut), "--text", "a dog", cwd=tmp_path),
            "vectors.faiss cannot be read (faiss finds it cut short or not an index)", "build the index again")


def test_a_folder_written_at_once_leaves_nothing_when_it_fails(tmp_path):
    from multimodal.files import atomic_folder

    with pytest.raises(UserError), atomic_folder(tmp_path / "out") as partial:
        (partial / "index.faiss").write_bytes(b"half")
        raise UserError("stopped")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "out") as partial:
        (partial / "info.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "info.json").is_file()


def test_the_choice_follows_the_count_and_the_budget():
    from multimodal.eval.index import EXACT_BELOW, choose, parse_memory

    assert parse_memory("4GB") == 4 << 30 and parse_memory("512M") == 512 << 20 and parse_memory("1.5g") == 3 << 29
    assert choose(10_000, 512, 4 << 30).factory == "IDMap,Flat"
    assert choose(EXACT_BELOW, 512, 4 << 30).factory.startswith("IVF")  # exact search is too slow above
    plan = choose(1_000_000, 512, 128_000_000)  # 1/8 of the raw float16 vectors
    assert plan.factory == "IVF4096,PQ128x4fs" and plan.bytes(1_000_000) <= 128_000_000
    assert plan.rerank == 100 and choose(1_000_000, 512, 64 << 20).rerank == 200  # coarser codes, more candidates
    assert choose(100_000_000, 512, 4 << 30).factory == "IVF32768_HNSW32,PQ64x4fs"
    with pytest.raises(UserError, match="smallest index of 1,000,000 512-d vectors"):
        choose(1_000_000, 512, 1 << 20)
