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

import torch


def _best_positive_ranks(queries: torch.Tensor, candidates: torch.Tensor, pos_query: torch.Tensor,
                         pos_candidate: torch.Tensor, chunk: int) -> torch.Tensor:
    """(Q,) number of candidates scoring strictly above each query's best positive.

    Positive pairs are (pos_query[i], pos_candidate[i]). Scores come from (chunk x chunk) blocks of
    queries @ candidates.T, and a positive's score is read from the very block product that the
    counting pass recomputes, so a query never outranks itself by a rounding difference.
    """
    ranks = torch.zeros(queries.shape[0], dtype=torch.long)
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0:q0 + chunk]
        best = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype, device=q.device)
        mine = (pos_query >= q0) & (pos_query < q0 + q.shape[0])
        rows, cols = pos_query[mine] - q0, pos_candidate[mine]
        for c0 in torch.unique(cols // chunk).tolist():
            block = q @ candidates[c0 * chunk:(c0 + 1) * chunk].T  # (chunk, chunk)
            here = (cols // chunk) == c0
            best.scatter_reduce_(0, rows[here], block[rows[here], cols[here] - c0 * chunk], reduce="amax")
        for c0 in range(0, candidates.shape[0], chunk):
            block = q @ candidates[c0:c0 + chunk].T  # (chunk, chunk)
            ranks[q0:q0 + q.shape[0]] += (block > best[:, None]).sum(1).cpu()
    return ranks


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the best positive: (M,) for text->image and (N,) for image->text.

    Args:
        image_features: (N, D) unit-norm image embeddings.
        text_features: (M, D) unit-norm caption embeddings.
        text_to_image: (M,) index of each caption's image in `image_features`.
    """
    text_to_image = text_to_image.long().to(image_features.device)
    captions = torch.arange(text_features.shape[0], device=image_features.device)
    t2i = _best_positive_ranks(text_features, image_features, captions, text_to_image, chunk_size)
    i2t = _best_positive_ranks(image_features, text_features, text_to_image, captions, chunk_size)
    return t2i, i2t


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
