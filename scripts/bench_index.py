"""Benchmark: `multimodal index` against autofaiss's choice and against exact search, on 1,000,000 vectors.

    python scripts/bench_index.py [--count 1000000] [--dim 512] [--threads 2]

The data: a synthetic embedding folder (.bench/index-<count>/emb, written once: float16 parts of 100,000
rows, as `multimodal embed` writes them) drawn from a stated mixture with the shape CLIP image embeddings
have. Unit vectors x = normalise(c_j + s * n) around 4,000 centres c_j, drawn with log-normal weights
(sigma 1: a few large topics, a long tail); the centres share a common direction (c_j = 0.8 * m +
0.6 * g_j), as CLIP embeddings fill a narrow cone (random pairs at cosine ~0.4 rather than 0); g_j and the
spread n are Gaussian with a power-law spectrum (the i-th of 512 latent directions has variance ~ 1/i: the top
100 directions carry ~75 % of the variance, as in CLIP embeddings' PCA), the whole turned by one random
rotation so that no coordinate is special. The spread s = 0.6 was chosen for nearest-neighbour cosines
like CLIP's at this scale: printed with the table (median near 0.9, the 10th neighbour a few hundredths
below, random pairs near 0.4). Queries are 1,000 (recall) and 10,000 (speed) fresh draws of the mixture.

Ours: `multimodal.eval.index.build_index` with --max_index_memory equal to 1/8 of the raw float16 vectors
(the target: index RAM <= 1/8), searched through `open_index`'s searcher (the IVF-PQ stage, then faiss's
IndexRefine re-ranking the candidates from the index's float16 vectors file, memory-mapped).
Theirs: autofaiss 2.18's `build_index` with the same `max_index_memory_usage`, left to choose its index and
its search parameters (its defaults: 10 ms a query, inner product), run in its own virtual environment
(.venv-autofaiss, created on first use: autofaiss pins numpy < 2, this project uses numpy 2). Its build is
slow on 2 cores (OPQ and 16,384 lists trained on every vector), so it runs once and its index and build
figures are kept in .bench/index-<count>/autofaiss (delete the folder to build it again); its queries are
timed afresh beside ours in every run.
Exact: a flat inner-product index over the float32 vectors (faiss IndexFlatIP), the ground truth.

Printed: recall@10 against exact; single-query and batched (1,000 a call) queries/s with `--threads` faiss
threads; index RAM (what the index holds in memory once loaded: faiss's serialised size, which is what
it allocates) against the raw float16 vectors; build time (wall, and CPU seconds: the machine is shared,
and CPU time is what a quieter machine's wall time approaches).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.reference_venvs import AUTOFAISS_PACKAGES, AUTOFAISS_VENV, reference_python  # noqa: E402

PART_ROWS = 100_000
CENTRES, CONE, SPREAD = 4000, 0.8, 0.6

THEIRS_BUILD = r"""
import json, resource, sys, time
from autofaiss import build_index
emb, out, budget, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
index, infos = build_index(embeddings=emb, index_path=out + "/knn.index", index_infos_path=out + "/infos.json",
                           max_index_memory_usage=budget, metric_type="ip", nb_cores=threads, verbose=30)
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"build_s": time.perf_counter() - wall,
                  "build_cpu_s": end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime, **infos}))
"""


def draw(rng: np.random.Generator, count: int, dim: int, centres: np.ndarray, weights: np.ndarray,
         spread_sd: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """(count, dim) float32 unit vectors of the mixture (see the module's docstring)."""
    labels = rng.choice(len(centres), count, p=weights)
    x = rng.standard_normal((count, dim), dtype=np.float32)
    x *= SPREAD * spread_sd
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x @ rotation


def mixture(dim: int, seed: int = 0):
    """The mixture's fixed parts: (centres, weights, spread_sd, rotation)."""
    rng = np.random.default_rng(seed)
    spread_sd = np.sqrt(1.0 / np.arange(1, dim + 1) / np.sum(1.0 / np.arange(1, dim + 1))).astype(np.float32)
    g = rng.standard_normal((CENTRES, dim), dtype=np.float32) * spread_sd
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    centres = np.sqrt(1 - CONE ** 2) * g
    centres[:, 0] += CONE  # the cone's axis: latent direction 0
    weights = rng.lognormal(0.0, 1.0, CENTRES)
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    return centres, weights / weights.sum(), spread_sd, rotation


def write_folder(folder: Path, count: int, dim: int) -> None:
    """The synthetic embedding folder, once (a finished one has its info.json)."""
    if (folder / "info.json").is_file():
        return
    print(f"Writing {count:,} synthetic {dim}-d vectors to {folder} (once)...", flush=True)
    parts = mixture(dim)
    rng = np.random.default_rng(1)
    for sub in ("img_emb", "img_index"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, count, PART_ROWS)):
        rows = min(PART_ROWS, count - start)
        np.save(folder / "img_emb" / f"part-{part:05d}.npy", draw(rng, rows, dim, *parts).astype(np.float16))
        (folder / "img_index" / f"part-{part:05d}.jsonl").write_text(
            "".join(f'{{"key": "{start + i:09d}"}}\n' for i in range(rows)))
    info = {"model": "bench-synthetic", "checkpoint": None, "pretrained": "mixture", "dtype": "float16",
            "source": {"synthetic": f"{CENTRES} centres, cone {CONE}, spread {SPREAD}"}, "part_size": PART_ROWS,
            "dim": dim}
    (folder / "info.json").write_text(json.dumps(info))


def queries(count: int, dim: int) -> np.ndarray:
    return draw(np.random.default_rng(7), count, dim, *mixture(dim))


def all_vectors(folder: Path) -> np.ndarray:
    return np.concatenate([np.load(p).astype(np.float32) for p in sorted((folder / "img_emb").glob("*.npy"))])


def build_theirs(emb: Path, out: Path, budget: str, threads: int) -> dict:
    """autofaiss's index of the folder's vectors (its float16 .npy parts as they are), built once."""
    done = out / "build.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    print(f"Building autofaiss's index under {budget} (once; slow on 2 cores)...", flush=True)
    python = reference_python(AUTOFAISS_VENV, AUTOFAISS_PACKAGES)
    proc = subprocess.run([str(python), "-c", THEIRS_BUILD, str(emb / "img_emb"), str(out), budget,
                           str(threads)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"autofaiss failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps(result))
    return result


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def speeds(search, queries: np.ndarray, single: int = 1000, batch: int = 1000) -> tuple[float, float]:
    """(single-query queries/s over `single` queries one at a time, batched queries/s over all in `batch`es)."""
    for q in queries[:50]:  # warm: the lists and the parts' pages in memory
        search(q[None])
    start = time.perf_counter()
    for q in queries[:single]:
        search(q[None])
    one = single / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        search(queries[i:i + batch])
    return one, len(queries) / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--theirs_only", action="store_true", help="build autofaiss's index and stop")
    parser.add_argument("--without_theirs", action="store_true", help="leave autofaiss out")
    args = parser.parse_args()
    root = REPO / ".bench" / f"index-{args.count}"
    emb = root / "emb"
    write_folder(emb, args.count, args.dim)
    raw = args.count * args.dim * 2
    budget = f"{raw // 8 >> 10}KB"  # 1/8 of the raw float16 vectors (KiB, as both read it)
    theirs = None if args.without_theirs else build_theirs(emb, root / "autofaiss", budget, args.threads)
    if args.theirs_only:
        print(json.dumps(theirs))
        return

    import faiss

    from multimodal.eval.index import build_index, open_index, parse_memory

    faiss.omp_set_num_threads(args.threads)
    shutil.rmtree(root / "ours", ignore_errors=True)
    wall, cpu = time.perf_counter(), cpu_seconds()
    build_index(emb, root / "ours", parse_memory(budget), "image")
    ours_build = (time.perf_counter() - wall, cpu_seconds() - cpu)

    drawn = np.ascontiguousarray(queries(11_000, args.dim))
    q_recall, q_speed = drawn[:1000], drawn[1000:]
    x = all_vectors(emb)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(x)
    del x
    truth = exact.search(q_recall, 10)[1]
    rows = []
    exact_speed = speeds(lambda q, flat=exact: flat.search(q, 10), q_speed[:2000], single=100)
    rows.append(("exact (faiss IndexFlatIP, float32)", 1.0, *exact_speed, exact.ntotal * args.dim * 4, None))
    del exact

    searcher, info = open_index(root / "ours")
    rows.append((f"ours ({info['factory']}, nprobe {info['nprobe']}, {info['rerank']} re-ranked)",
                 recall(searcher.search(q_recall, 10)[1], truth), *speeds(lambda q: searcher.search(q, 10), q_speed),
                 (root / "ours" / "index.faiss").stat().st_size, ours_build))
    if theirs is not None:
        index = faiss.read_index(str(root / "autofaiss" / "knn.index"))
        faiss.ParameterSpace().set_index_parameters(index, theirs["index_param"])
        rows.append((f"autofaiss ({theirs['index_key']}, {theirs['index_param']})",
                     recall(index.search(q_recall, 10)[1], truth), *speeds(lambda q: index.search(q, 10), q_speed),
                     (root / "autofaiss" / "knn.index").stat().st_size, (theirs["build_s"], theirs["build_cpu_s"])))
    print(f"\n{args.count:,} vectors of {args.dim}-d (raw float16: {raw / 2**20:,.0f} MiB), budget {budget}, "
          f"{args.threads} faiss threads, load average {os.getloadavg()[0]:.1f}; recall@10 against exact search "
          f"on 1,000 held-out queries (targets: recall >= 0.95, single >= 500/s, batched >= 5,000/s, RAM <= 1/8)")
    print(f"{'':<60} {'recall@10':>9} {'single q/s':>10} {'batched q/s':>11} {'index RAM':>18} "
          f"{'build wall / CPU':>18}")
    for name, rec, one, many, size, build in rows:
        ratio = f"1/{raw / size:.1f}" if size < raw else f"x{size / raw:.1f}"
        ram = f"{size / 2**20:,.0f} MiB ({ratio})"
        made = f"{build[0] / 60:.1f} / {build[1] / 60:.1f} min" if build else "-"
        print(f"{name:<60} {rec:>9.3f} {one:>10,.0f} {many:>11,.0f} {ram:>18} {made:>18}")
    print(f"ours also reads its float16 vectors file ({raw / 2**20:,.0f} MiB on disk, memory-mapped: the page cache, "
          f"not the process's memory) for the {info['rerank']} candidates it re-ranks a query; recall@10 at build time "
          f"({info['recall_queries']}): {info['recall@10']:.3f}")


if __name__ == "__main__":
    main()
