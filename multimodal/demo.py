"""The embedded default's report: held-out retrieval next to chance, the curves, a contact sheet."""

from pathlib import Path

import torch

from multimodal.eval.embed import embed_shards
from multimodal.eval.retrieval import chance_recall, retrieval_metrics, table
from multimodal.eval.search import contact_sheet, load_images, top_k
from multimodal.files import save_image, write_json, write_text
from multimodal.model import CLIP
from multimodal.plot import plot_run

KS = (1, 5, 10)
# Queries that need colour, shape, size, place and count bound together.
QUERIES = (
    "a large red circle on the left",
    "a small blue square to the left of a large yellow triangle",
    "three green triangles",
    "on the left a white triangle, on the right a purple circle",
)


def report(model: CLIP, shards: str, run_dir: Path, batch_size: int = 256) -> dict:
    """Embed the held-out `shards`; print and write retrieval.json/.txt, curves.png and retrieval.png."""
    emb = embed_shards(model, shards, batch_size, progress=False)
    metrics = retrieval_metrics(emb.image_features, emb.text_features, emb.text_to_image, ks=KS)
    num_images, num_texts = emb.image_features.shape[0], emb.text_features.shape[0]
    ratio = metrics["image_retrieval_recall@5"] / chance_recall(num_images, 5)
    print(f"\nZero-shot retrieval on {num_images} held-out images with {num_texts} captions ({shards})")
    verdict = "learned" if ratio >= 10 else "below the 10x target"
    summary = f"{table(metrics, num_images, num_texts, KS)}\ntext -> image recall@5 is {ratio:.1f}x chance ({verdict})."
    print(summary)
    result = {"num_images": num_images, "num_texts": num_texts, **metrics,
              "image_retrieval_recall@5_over_chance": ratio}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "retrieval.json", result)
    write_text(run_dir / "retrieval.txt", summary + "\n")
    curves = plot_run(run_dir) if (run_dir / "metrics.csv").is_file() else None  # none before the first log

    with torch.no_grad():
        queries = model.eval().encode_text(model.architecture.tokenizer(list(QUERIES)))
    lines = []
    for text, query in zip(QUERIES, queries):
        hits = top_k(emb.image_features, query, 6)
        images = load_images(emb, [row for row, _ in hits])
        lines.append((f'"{text}"', [(im, f"{score:.3f}") for im, (_, score) in zip(images, hits)]))
    save_image(contact_sheet(lines, tile=112), run_dir / "retrieval.png")
    print(f"Wrote {run_dir / 'retrieval.json'}, retrieval.txt (the table), "
          f"{f'{curves.name} and ' if curves else ''}retrieval.png")
    return result
