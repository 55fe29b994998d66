"""The embedded default's report: held-out retrieval next to chance, the curves, a contact sheet; for a
CoCa model also its captions of the held-out scenes, scored next to chance and a constant caption."""

import json
from collections import Counter
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


def caption_report(model: CLIP, shards: str, train_shards: str, run_dir: Path, batch_size: int = 64) -> dict:
    """Greedy captions of the held-out scenes `shards`: CIDEr and BLEU-4 against their captions, and how
    often a caption names the scene's colours, its shapes and its count (`synthetic.mentions`: all of them
    and nothing else), next to two baselines scored the same way: chance (each scene given the caption of
    another held-out scene) and the training set's most common caption for every scene. Writes
    captions.json and captions.png (the first scenes with their captions)."""
    from multimodal.data.sources import ShardSource
    from multimodal.decoding import Decoding
    from multimodal.eval.captioning import caption_metrics, chance_captions
    from multimodal.eval.captions import caption_source, collect_captions
    from multimodal.eval.search import captioned_sheet

    source = ShardSource(shards)
    generated, references, rows = collect_captions(caption_source(
        model, source, list(range(source.num_parts())), Decoding("greedy"), batch_size=batch_size, decode="cpu"))
    keys = sorted(generated)
    common = Counter(_captions(ShardSource(train_shards).urls)).most_common(1)[0][0]
    systems = {"model": generated, "chance": chance_captions(references),
               "most common caption": dict.fromkeys(keys, common)}
    result = {name: {**caption_metrics(captions, references), **_named_right(captions, references)}
              for name, captions in systems.items()}
    lines = [f"{'':22}{'CIDEr':>8}{'BLEU-4':>8}{'colours':>9}{'shapes':>8}{'counts':>8}{'all':>7}"]
    for name, m in result.items():
        lines.append(f"{name:22}{m['cider']:8.3f}{m['bleu4']:8.3f}{m['colours']:9.3f}{m['shapes']:8.3f}"
                     f"{m['counts']:8.3f}{m['all']:7.3f}")
    summary = f"Captions of {len(keys)} held-out scenes (greedy), against their captions:\n" + "\n".join(lines)
    print("\n" + summary)
    write_json(run_dir / "captions.json", {**result, "most_common_caption": common, "examples": rows[:20]})
    save_image(captioned_sheet(rows[:12], tile=128), run_dir / "captions.png")
    print(f"Wrote {run_dir / 'captions.json'} and captions.png")
    return result


def _named_right(captions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """The fraction of images whose caption names exactly the colours, shapes and counts of its references."""
    from multimodal.data.synthetic import mentions

    right = Counter()
    for key, caption in captions.items():
        said, truth = mentions(caption), [mentions(r) for r in references[key]]
        hits = {kind: said[kind] == frozenset().union(*(t[kind] for t in truth)) for kind in said}
        right.update(kind for kind, hit in hits.items() if hit)
        right["all"] += all(hits.values())
    return {kind: right[kind] / len(captions) for kind in ("colours", "shapes", "counts", "all")}


def _captions(urls: list[str]) -> list[str]:
    """Every caption of the shards at `urls` (their .json members), without decoding an image."""
    from multimodal.data.tario import tar_members

    out = []
    for url in urls:
        with open(url, "rb") as stream:
            out.extend(c for name, data in tar_members(stream) if name.endswith(".json")
                       for c in json.loads(data)["captions"])
    return out
