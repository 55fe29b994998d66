"""The embedded default's report: retrieval on the held-out synthetic scenes next to chance."""

import json
from pathlib import Path

from multimodal.eval.embed import embed_shards
from multimodal.eval.retrieval import chance_recall, retrieval_metrics
from multimodal.model import CLIP

KS = (1, 5, 10)


def retrieval_report(model: CLIP, model_name: str, shards: str, out_dir: Path, batch_size: int = 256) -> dict:
    """Embed `shards`, print recall@1/5/10 both ways beside chance, write `retrieval.json`."""
    emb = embed_shards(model, model_name, shards, batch_size, progress=False)
    metrics = retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image, ks=KS)
    num_images, num_texts = emb.image_features.shape[0], emb.text_features.shape[0]
    per_image = num_texts / num_images
    print(f"\nZero-shot retrieval on {num_images} held-out images with {num_texts} captions ({shards})")
    print(f"{'':16}" + "".join(f"{f'R@{k}':>9}{'chance':>9}" for k in KS))
    rows = (
        ("text -> image", "image_retrieval_recall", lambda k: chance_recall(num_images, k)),
        ("image -> text", "text_retrieval_recall", lambda k: min(1.0, 1 - _miss_all(num_texts, per_image, k))),
    )
    for label, key, chance in rows:
        print(f"{label:16}" + "".join(f"{metrics[f'{key}@{k}']:9.3f}{chance(k):9.3f}" for k in KS))
    ratio = metrics["image_retrieval_recall@5"] / chance_recall(num_images, 5)
    print(f"text -> image recall@5 is {ratio:.1f}x chance ({'learned' if ratio >= 10 else 'below the 10x target'}).")
    result = {"num_images": num_images, "num_texts": num_texts, **metrics,
              "image_retrieval_recall@5_over_chance": ratio}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"Wrote {out_dir / 'retrieval.json'}")
    return result


def _miss_all(num_texts: int, positives: float, k: int) -> float:
    """Chance that a random top-k of `num_texts` captions holds none of an image's `positives`."""
    p = 1.0
    for i in range(k):
        p *= max(0.0, (num_texts - positives - i) / (num_texts - i))
    return p
