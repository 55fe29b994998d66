"""Benchmark: embedding images and captions, our evaluation pipeline against open_clip's eval transform.

    python scripts/bench_embed.py [--data ../shared/data/coco-mini] [--workers 2] [--batch-size 256] [--passes 5]
    python scripts/bench_embed.py --decode gpu    (the device path on the CPU too)

Both embed every image and all its captions of the same shards of full-size COCO JPEGs (about
640 x 480, written once into .bench/ by bench_data.py; 239 images, listed `--passes` times), with the
same model, batch size and DataLoader workers, through `multimodal.eval.embed.embed_shards`:
- ours: JPEGs decoded by libjpeg-turbo at the smallest DCT scale keeping the shorter side at the
  model's input size, resized by torch's antialiased kernel, uint8 to the device, normalised there;
- ours, decoded on the GPU (where CUDA is present, or with `--decode gpu`): the workers hand over the
  JPEG bytes; each batch is decoded together by nvJPEG, resized and centre-cropped on the GPU;
- open_clip: every image decoded at full size by PIL and put through open_clip's eval transform
  (PIL resize, centre crop, normalisation on the CPU), as clip_benchmark and open_clip do.
Prints images/s of each (their captions included) and the ratios to open_clip. The model: `tiny` (64 px) on the
CPU, where the model costs little and the pipeline shows; ViT-B-32 with bf16 on a GPU.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_data import shards  # noqa: E402

from multimodal import arch  # noqa: E402
from multimodal.arch import Architecture  # noqa: E402
from multimodal.data.pixels import OpenClipEvalTransform  # noqa: E402
from multimodal.eval import embed  # noqa: E402
from multimodal.model import create_model  # noqa: E402


def rate(model, architecture: Architecture, spec: str, batch_size: int, workers: int, device: torch.device,
         path: str) -> float:
    """Images/s through `path`: "workers" or "gpu" (ours, decoded there) or "open_clip" (the reference)."""
    preprocess = OpenClipEvalTransform(architecture.preprocessing) if path == "open_clip" else None
    start = time.perf_counter()
    with embed.autocast(device):
        emb = embed.embed_shards(model, spec, batch_size, workers, device, progress=False,
                                 preprocess=preprocess, decode="gpu" if path == "gpu" else "cpu")
    return emb.image_features.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "coco-mini")
    parser.add_argument("--model", default=None, help="default: tiny on the CPU, ViT-B-32 on a GPU")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two this many times, keep the best")
    parser.add_argument("--passes", type=int, default=5, help="list the shards this many times (more images)")
    parser.add_argument("--decode", choices=("auto", "gpu"), default="auto",
                        help="also time ours decoded on the device: auto (where CUDA is present) or gpu (always)")
    args = parser.parse_args()
    if not (args.data / "annotations").is_dir():
        sys.exit(f"{args.data} is not a COCO folder (annotations/, train2017/, val2017/).")
    device = embed.default_device()
    architecture = arch.load(args.model or ("ViT-B-32" if device.type == "cuda" else "tiny"))
    spec = "::".join([shards(args.data)] * args.passes)
    model = create_model(architecture).eval().to(device)
    paths = ["workers", *(["gpu"] if args.decode == "gpu" or device.type == "cuda" else []), "open_clip"]
    rate(model, architecture, spec, args.batch_size, args.workers, device, "workers")  # warm-up: files cached
    best = dict.fromkeys(paths, 0.0)
    for _ in range(args.repeats):
        for path in paths:
            best[path] = max(best[path], rate(model, architecture, spec, args.batch_size, args.workers, device, path))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"embedding full-size COCO JPEGs and their captions, {architecture.name} ({architecture.image_size} px), "
          f"batch {args.batch_size}, {args.workers} workers, {where}")
    labels = {"workers": "ours", "gpu": "ours, --decode gpu", "open_clip": "open_clip"}
    notes = {"workers": "with their captions; JPEGs decoded by the workers",
             "gpu": f"with their captions; JPEGs decoded a batch at a time on the {device.type.upper()}",
             "open_clip": "eval transform on full-size PIL images"}
    for path in paths:
        print(f"  {labels[path]:<20} {best[path]:8.1f} images/s ({notes[path]})")
    for path in paths[:-1]:
        print(f"  ratio, {labels[path]:<18} {best[path] / best['open_clip']:6.2f}x (/ open_clip)")


if __name__ == "__main__":
    main()
