"""Benchmark: how long a checkpoint takes to reach a bucket, on a local S3-compatible server (moto's, started here).

    python scripts/bench_upload.py [--sizes tiny,vit-b-32] [--repeats 2]

Uploads a file of each checkpoint's size through `multimodal.remote.upload` (s3fs's put_file: one PUT, or a
multipart upload above its block size; the object appears whole once complete), the way a remote run mirrors
each checkpoint after its local write, and prints seconds and MB/s (median of the repeats). Sizes: a
`multimodal train` checkpoint of the tiny model (weights, AdamW's two moments, the loops' state: 0.09 GB) and
of ViT-B-32 (151M parameters: 1.82 GB), as scripts/bench_preempt.py measured them. The server runs on this
machine (moto keeps objects in memory), so the figure is the client's and the server's cost, not a
network's: on a cluster, the link to the store bounds it.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from local_s3 import moto_server  # noqa: E402

SIZES = {"tiny": 0.09e9, "vit-b-32": 1.82e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,vit-b-32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with moto_server() as endpoint:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import boto3

        from multimodal import remote

        boto3.client("s3").create_bucket(Bucket="bench")
        print(f"{'checkpoint':<12}{'GB':>6}{'seconds':>10}{'MB/s':>8}")
        with tempfile.TemporaryDirectory() as folder:
            for name in args.sizes.split(","):
                path = Path(folder) / f"{name}.ckpt"
                with open(path, "wb") as f:  # incompressible bytes, written in 64 MiB pieces
                    left = int(SIZES[name])
                    while left:
                        piece = min(left, 64 << 20)
                        f.write(os.urandom(piece))
                        left -= piece
                times = []
                for i in range(args.repeats):
                    start = time.perf_counter()
                    remote.upload(path, f"s3://bench/run/checkpoints/{name}-{i}.ckpt")
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                print(f"{name:<12}{SIZES[name] / 1e9:6.2f}{seconds:10.2f}{SIZES[name] / 1e6 / seconds:8.0f}")
                path.unlink()


if __name__ == "__main__":
    main()
