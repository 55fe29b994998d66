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


def _positive_scores(image_features: torch.Tensor, text_features: torch.Tensor,
                     text_to_image: torch.Tensor) -> torch.Tensor:
    """(M,) score of each caption with its own image."""
    return (text_features * image_features[text_to_image]).sum(-1)


def _count_above(queries: torch.Tensor, candidates: torch.Tensor, thresholds: torch.Tensor, chunk: int) -> torch.Tensor:
    """(Q,) number of candidates scoring strictly above each query's threshold, in blocks."""
    counts = torch.zeros(queries.shape[0], dtype=torch.long)
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0:q0 + chunk]
        t = thresholds[q0:q0 + chunk, None]
        for c0 in range(0, candidates.shape[0], chunk):
            scores = q @ candidates[c0:c0 + chunk].T  # (chunk, chunk)
            counts[q0:q0 + chunk] += (scores > t).sum(1).cpu()
    return counts


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                    chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the best positive: (M,) for text->image and (N,) for image->text.

    Args:
        image_features: (N, D) unit-norm image embeddings.
        text_features: (M, D) unit-norm caption embeddings.
        text_to_image: (M,) index of each caption's image in `image_features`.
    """
    image_features, text_features = image_features.float(), text_features.float()
    text_to_image = text_to_image.long().to(image_features.device)
    positive = _positive_scores(image_features, text_features, text_to_image)  # (M,)
    t2i = _count_above(text_features, image_features, positive, chunk_size)
    best = torch.full((image_features.shape[0],), float("-inf"), device=image_features.device)
    best = best.scatter_reduce(0, text_to_image, positive, reduce="amax")  # (N,) best positive per image
    i2t = _count_above(image_features, text_features, best, chunk_size)
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
