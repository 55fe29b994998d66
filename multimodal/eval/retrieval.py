"""Zero-shot image<->text retrieval metrics over sets with several captions per image.

The CLIP-paper / clip_benchmark definitions, with clip_benchmark's key names:
- `image_retrieval_recall@k` (text -> image): the fraction of captions whose image is among the
  k images scored highest for it.
- `text_retrieval_recall@k` (image -> text): the fraction of images with at least one of their
  captions among the k captions scored highest for them.

A query's rank is the number of candidates scoring strictly higher than its best positive, so a
hit at k means rank < k (ties are resolved in the query's favour). Scores are computed in
(chunk x chunk) blocks: memory stays bounded by the chunk sizes, never by images x captions.
"""

from collections.abc import Callable

import torch

from multimodal.errors import UserError


def _blocks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the best positive: (M,) for text->image and (N,) for image->text.

    Args:
        image_features: (N, D) unit-norm image embeddings.
        text_features: (M, D) unit-norm caption embeddings.
        text_to_image: (M,) index of each caption's image in `image_features`.

    Scores are (chunk x chunk) blocks of text_features @ image_features.T. A first pass reads every
    caption's positive score from the block that holds it; one more pass over all blocks counts,
    for both directions at once, the candidates scoring strictly above each query's best positive.
    Positives are read from the very products that are counted, so rounding never ranks a query
    below itself.
    """
    device = image_features.device
    text_to_image = text_to_image.long().to(device)
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    image_blocks, text_blocks = _blocks(num_images, chunk_size), _blocks(num_texts, chunk_size)
    positive = torch.empty(num_texts, dtype=text_features.dtype, device=device)
    for t0, t1 in text_blocks:
        targets = text_to_image[t0:t1]
        for b in torch.unique(targets // chunk_size).tolist():
            i0, i1 = image_blocks[b]
            scores = text_features[t0:t1] @ image_features[i0:i1].T  # (chunk, chunk)
            rows = (targets // chunk_size == b).nonzero().squeeze(1)
            positive[t0 + rows] = scores[rows, targets[rows] - i0]
    best_image = torch.full((num_images,), float("-inf"), dtype=positive.dtype, device=device)
    best_image.scatter_reduce_(0, text_to_image, positive, reduce="amax")  # best caption of each image

    t2i = torch.zeros(num_texts, dtype=torch.long, device=device)
    i2t = torch.zeros(num_images, dtype=torch.long, device=device)
    for t0, t1 in text_blocks:
        for i0, i1 in image_blocks:
            scores = text_features[t0:t1] @ image_features[i0:i1].T  # (chunk, chunk)
            t2i[t0:t1] += (scores > positive[t0:t1, None]).sum(1)
            i2t[i0:i1] += (scores > best_image[None, i0:i1]).sum(0)
    return t2i.cpu(), i2t.cpu()


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 4096) -> dict[str, float]:
    """Recall@k both ways plus mean and median rank (1-based), keyed as clip_benchmark keys them."""
    t2i, i2t = retrieval_ranks(image_features, text_features, text_to_image, chunk_size)
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (t2i < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (i2t < k).float().mean().item()
    metrics["image_retrieval_mean_rank"] = (t2i + 1).float().mean().item()
    metrics["image_retrieval_median_rank"] = (t2i + 1).float().median().item()
    metrics["text_retrieval_mean_rank"] = (i2t + 1).float().mean().item()
    metrics["text_retrieval_median_rank"] = (i2t + 1).float().median().item()
    return metrics


def evaluate_embeddings(emb, ks: tuple[int, ...] = (1, 5, 10), chunk_size: int = 4096
                        ) -> tuple[dict[str, float], int, int]:
    """(metrics, images, captions) of the images and captions of `emb` (`eval.embed.Embeddings`); the
    texts that belong to no image (`text_to_image` -1, from a text file) take no part."""
    if emb.image_features.shape[0] == 0 or (emb.text_to_image < 0).all():
        raise UserError("Retrieval needs images with captions: embed shards, not only a folder of images or a "
                        "text file.")
    keep = emb.text_to_image >= 0
    metrics = retrieval_metrics(emb.image_features, emb.text_features[keep], emb.text_to_image[keep], ks=ks,
                                chunk_size=chunk_size)
    return metrics, emb.image_features.shape[0], int(keep.sum())


def first_caption_loss(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int) -> float:
    """Mean in-batch loss of every image with its first caption, in batches of `batch_size` images
    (a last batch of one image, which has no negatives, is left out): the held-out loss (`val/loss`).
    `text_to_image` is (M,), -1 for a caption of no image."""
    first: dict[int, int] = {}
    for row, image in enumerate(text_to_image.tolist()):
        if image >= 0:
            first.setdefault(image, row)
    images = sorted(first)
    images_f, texts_f = image_features[images], text_features[[first[i] for i in images]]  # (N, D) each
    losses = [loss_fn(images_f[i:i + batch_size], texts_f[i:i + batch_size])
              for i in range(0, len(images), batch_size) if len(images[i:i + batch_size]) > 1]
    return torch.stack(losses).mean().item()


def chance_recall(num_candidates: int, k: int) -> float:
    """Expected recall@k of a random ranking with one positive among `num_candidates`."""
    return min(1.0, k / num_candidates)


def chance_any_of(num_candidates: int, positives: float, k: int) -> float:
    """Expected recall@k of a random ranking when a query has `positives` among `num_candidates`."""
    miss = 1.0
    for i in range(min(k, num_candidates)):
        miss *= max(0.0, (num_candidates - positives - i) / (num_candidates - i))
    return 1.0 - miss


def table(metrics: dict[str, float], num_images: int, num_texts: int, ks: tuple[int, ...] = (1, 5, 10)) -> str:
    """Recall@k both ways beside chance, as printed by `eval retrieval` and the demo."""
    lines = [f"{'':16}" + "".join(f"{f'R@{k}':>9}{'chance':>9}" for k in ks)]
    per_image = num_texts / max(1, num_images)
    rows = (("text -> image", "image_retrieval_recall", lambda k: chance_recall(num_images, k)),
            ("image -> text", "text_retrieval_recall", lambda k: chance_any_of(num_texts, per_image, k)))
    for label, key, chance in rows:
        lines.append(f"{label:16}" + "".join(f"{metrics[f'{key}@{k}']:9.3f}{chance(k):9.3f}" for k in ks))
    lines.append(f"{'mean rank':16}{'text->image':>12} {metrics['image_retrieval_mean_rank']:.1f}"
                 f"   image->text {metrics['text_retrieval_mean_rank']:.1f}")
    return "\n".join(lines)
