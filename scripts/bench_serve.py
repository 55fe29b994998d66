"""Benchmark: `multimodal serve` under load. Many concurrent clients on this machine send text queries for a fixed
time; printed: queries/s, latency p50/p90/p99, errors, the mean batch the server encoded, and the CPU the
server's process used (cores, and milliseconds a query).

    python scripts/bench_serve.py [--rows 100000] [--clients 16] [--seconds 20] [--k 10] [--faiss]

The index is synthetic, and says so: `--rows` random unit vectors of the `tiny` model's size (128), written as
an embedding folder (float16 parts of 10,000 rows, the layout `multimodal embed` writes, each row with a key and
a caption and no image), and a freshly initialised `tiny` model exported as its weights: the latency of a query
(tokenise, encode, score every row, answer) does not depend on what the vectors mean. Without `--faiss` the
folder is searched exactly (every row scored: a (B, 128) x (128, N) product a batch); with it, `multimodal
index` builds a faiss index of the folder first and the server searches that. The server runs in its own
process (`multimodal serve --port 0`), the clients in this one (asyncio, one kept-alive connection each,
HTTP/1.1 written by hand to keep their CPU small), each sending its next query as soon as the last is
answered; the first `--warmup` seconds are not counted. An error is any answer but 200 with k results, or a
failed connection.
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = ("a dog cat man woman child red blue green small large running sitting on the grass beach street snow "
         "water ball bicycle car white black young two three playing jumping in front of near with").split()
PART_ROWS = 10_000


def write_folder(root: Path, rows: int, seed: int = 0) -> Path:
    """A synthetic embedding folder of `rows` random unit vectors, with a fresh `tiny` model as its weights."""
    from multimodal.files import write_json, write_text
    from multimodal.recipe import build_module
    from multimodal.weights import export

    model = build_module("tiny", count_flops=False).model
    weights = export(model, root / "model" / "tiny.safetensors")[0]
    dim = model.architecture.embed_dim
    folder = root / "emb"
    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(0, rows, PART_ROWS)):
        n = min(PART_ROWS, rows - start)
        vectors = rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        (folder / "img_emb").mkdir(parents=True, exist_ok=True)
        np.save(folder / "img_emb" / f"part-{part:05d}.npy", vectors.astype(np.float16))
        write_text(folder / "img_index" / f"part-{part:05d}.jsonl",
                   "".join(json.dumps({"key": f"{start + i:09d}", "caption": f"synthetic vector {start + i}"}) + "\n"
                           for i in range(n)))
    write_json(folder / "info.json", {"model": "tiny", "checkpoint": str(weights), "dim": dim,
                                      "source": {"synthetic": f"{rows} random unit vectors"}})
    return folder


def start_server(index: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "multimodal", "serve", "--index", str(index), "--port", "0",
                             "--max_batch", str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=index.parent)
    line = proc.stdout.readline()
    found = re.search(r"http://\S+?/", line)
    if found is None:
        proc.kill()
        sys.exit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, found.group(0).rstrip("/")


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str) -> tuple[int, bytes]:
    """(status, body) of one GET on a kept-alive HTTP/1.1 connection: a client as small as can be, so that the
    clients take little of the CPU the server is measured on (httpx takes about 1 ms a request)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return status, await reader.readexactly(length)


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, clients: int, seconds: float, warmup: float, k: int, pid: int
               ) -> tuple[list[float], int, float, float]:
    """(latencies in seconds, errors, counted seconds, the server's CPU seconds meanwhile) of `clients` loops
    sending queries for `seconds` after `warmup`."""
    from urllib.parse import quote, urlsplit

    address = urlsplit(url)
    cpu: list[float] = []
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    counted_from, end = start + warmup, start + warmup + seconds

    async def client(number: int) -> None:
        nonlocal errors
        rng = random.Random(number)
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        while (now := time.perf_counter()) < end:
            query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
            try:
                status, body = await get(reader, writer, address.netloc, f"/api/search?q={quote(query)}&k={k}")
                ok = status == 200 and len(json.loads(body)["results"]) == k
            except (OSError, asyncio.IncompleteReadError, ValueError, AttributeError):
                ok = False
                writer.close()
                reader, writer = await asyncio.open_connection(address.hostname, address.port)
            done = time.perf_counter()
            if now >= counted_from:
                latencies.append(done - now)
                errors += not ok
        writer.close()

    async def meter() -> None:
        await asyncio.sleep(warmup)
        cpu.append(cpu_seconds(pid))
        await asyncio.sleep(seconds)
        cpu.append(cpu_seconds(pid))

    await asyncio.gather(meter(), *(client(i) for i in range(clients)))
    return latencies, errors, time.perf_counter() - counted_from, cpu[1] - cpu[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic index (default 10^5)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seconds", type=float, default=20, help="counted seconds of load (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of load not counted first (default 3)")
    parser.add_argument("--k", type=int, default=10, help="results a query (default 10)")
    parser.add_argument("--max_batch", type=int, default=64, help="the server's --max_batch (default 64)")
    parser.add_argument("--faiss", action="store_true", help="search a faiss index of the folder, not the folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        built = time.perf_counter()
        index = write_folder(root, args.rows)
        if args.faiss:
            subprocess.run([sys.executable, "-m", "multimodal", "index", str(index), "--out", str(root / "index")],
                           check=True, stdout=subprocess.DEVNULL)
            index = root / "index"
        print(f"{args.rows:,} synthetic rows written{' and indexed' if args.faiss else ''} in "
              f"{time.perf_counter() - built:.1f} s", flush=True)
        proc, url = start_server(index, args.max_batch)
        try:
            latencies, errors, seconds, cpu = asyncio.run(load(url, args.clients, args.seconds, args.warmup, args.k,
                                                               proc.pid))
            import httpx

            info = httpx.get(f"{url}/api/info", timeout=10).json()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    ms = sorted(x * 1000 for x in latencies)
    quantile = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    target = info["targets"]["images"]
    print(f"index: {target['count']:,} rows, {target['search']}; {args.clients} clients for {seconds:.1f} s, "
          f"k={args.k}, {os.cpu_count()} CPU cores")
    print(f"queries/s {len(ms) / seconds:.1f}   latency p50 {quantile(0.5):.1f} ms   p90 {quantile(0.9):.1f} ms   "
          f"p99 {quantile(0.99):.1f} ms   mean {statistics.fmean(ms):.1f} ms")
    print(f"queries {len(ms)}   errors {errors}   mean batch {info['queries'] / max(info['batches'], 1):.1f} queries   "
          f"server CPU {cpu / seconds:.2f} cores, {cpu / max(len(ms), 1) * 1000:.2f} ms a query")


if __name__ == "__main__":
    main()
