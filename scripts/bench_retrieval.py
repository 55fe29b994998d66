"""Benchmark: our chunked retrieval metric against clip_benchmark's, on the same embeddings.

    python scripts/bench_retrieval.py [--sizes 5000x25000 50000x250000] [--dim 512] [--chunk 4096]

For each size (images x captions, five captions an image) both implementations score the same
random unit-norm embeddings in separate processes; the script prints their recall@1/5/10 (which
must be equal), wall time, and peak memory above the embeddings themselves, with the ratios.
clip_benchmark materialises the full captions x images score matrix (and a boolean one beside
it); where that cannot fit in this machine's memory it is reported as not run, with the size it
would need.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

from multimodal.eval.retrieval import retrieval_metrics

KS = (1, 5, 10)


def embeddings(num_images: int, num_texts: int, dim: int):
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    text_to_image = torch.arange(num_texts) % num_images
    # Caption noise of norm ~10 against unit-norm images: recall@1 in the tens of percent, not 0 or 1.
    text = F.normalize(image[text_to_image] + 0.45 * torch.randn(num_texts, dim, generator=g), dim=-1)
    return image, text, text_to_image


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set size
        f.write("5")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_ours(image, text, t2i, chunk: int) -> dict:
    return retrieval_metrics(image, text, t2i, ks=KS, chunk_size=chunk)


def run_clip_benchmark(image, text, t2i, chunk: int) -> dict:
    """clip_benchmark's `evaluate` after its embedding loop (its batch_size 64 default)."""
    scores = text @ image.T
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), t2i] = True
    out = {}
    for k in KS:
        out[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, scores, positive_pairs, 64, "cpu", k=k)
                                              > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, scores.T, positive_pairs.T, 64, "cpu", k=k)
                                             > 0).float().mean().item()
    return out


def child(which: str, num_images: int, num_texts: int, dim: int, chunk: int) -> None:
    image, text, t2i = embeddings(num_images, num_texts, dim)
    base = rss_kib("VmRSS:")  # code and embeddings are in memory: what follows is the metric's own
    peak_rss_reset()
    start = time.perf_counter()
    metrics = (run_ours if which == "ours" else run_clip_benchmark)(image, text, t2i, chunk)
    seconds = time.perf_counter() - start
    extra_mib = (rss_kib("VmHWM:") - base) / 1024
    print(json.dumps({"metrics": metrics, "seconds": seconds, "extra_mib": extra_mib}))


def measure(which: str, num_images: int, num_texts: int, dim: int, chunk: int) -> dict:
    command = [sys.executable, __file__, "--child", which, "--sizes", f"{num_images}x{num_texts}",
               "--dim", str(dim), "--chunk", str(chunk)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["5000x25000", "50000x250000"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        num_images, num_texts = map(int, args.sizes[0].split("x"))
        return child(args.child, num_images, num_texts, args.dim, args.chunk)
    print(f"threads: {torch.get_num_threads()}, cores: {os.cpu_count()}, dim {args.dim}, chunk {args.chunk}")
    for size in args.sizes:
        num_images, num_texts = map(int, size.split("x"))
        ours = measure("ours", num_images, num_texts, args.dim, args.chunk)
        needed = num_images * num_texts * 5 / 2**20  # float32 scores + bool positives, in MiB
        if needed > 0.8 * available_mib():
            theirs = {"error": f"not run: its {num_texts} x {num_images} score matrices need {needed / 1024:.0f} GiB "
                               f"of the {available_mib() / 1024:.0f} GiB available"}
        else:
            theirs = measure("clip_benchmark", num_images, num_texts, args.dim, args.chunk)
        print(f"\n{num_images} images x {num_texts} captions")
        for name, result in (("ours", ours), ("clip_benchmark", theirs)):
            if "error" in result:
                print(f"  {name:15} {result['error']}")
            else:
                recalls = " ".join(f"{result['metrics'][f'{d}_retrieval_recall@{k}']:.4f}"
                                   for d in ("image", "text") for k in KS)
                print(f"  {name:15} {result['seconds']:8.2f} s {result['extra_mib']:9.0f} MiB   "
                      f"R@1/5/10 t->i, i->t: {recalls}")
        if "error" not in ours and "error" not in theirs:
            same = all(ours["metrics"][k] == v for k, v in theirs["metrics"].items())
            print(f"  results equal: {same};  time clip_benchmark/ours: {theirs['seconds'] / ours['seconds']:.2f}x;"
                  f"  memory clip_benchmark/ours: {theirs['extra_mib'] / max(ours['extra_mib'], 1):.1f}x")


if __name__ == "__main__":
    main()
