"""Benchmark: our clip_loss against open_clip's ClipLoss, forward + backward, side by side.

    python scripts/bench_loss.py [--batch 256 1024 4096] [--dim 512] [--repeats 20]

Prints milliseconds per call for both and their ratio (open_clip / ours: above 1 means ours is
faster), after checking that both give the same loss.
"""

import argparse
import time

import open_clip
import torch
import torch.nn.functional as F

from multimodal.loss import clip_loss


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    reference = open_clip.loss.ClipLoss()
    print(f"{'batch':>6} {'ours ms':>9} {'open_clip ms':>13} {'ratio':>6}")
    for n in args.batch:
        image = F.normalize(torch.randn(n, args.dim), dim=-1).requires_grad_()
        text = F.normalize(torch.randn(n, args.dim), dim=-1).requires_grad_()
        scale = torch.tensor(14.3, requires_grad=True)
        torch.testing.assert_close(clip_loss(image, text, scale), reference(image, text, scale))
        ours = timed(lambda: clip_loss(image, text, scale).backward(), args.repeats)
        theirs = timed(lambda: reference(image, text, scale).backward(), args.repeats)
        print(f"{n:>6} {ours:9.2f} {theirs:13.2f} {theirs / ours:6.2f}")


if __name__ == "__main__":
    main()
