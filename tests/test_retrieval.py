"""Chunked retrieval metrics against a brute-force top-k reference (clip_benchmark's definition)."""

import pytest
import torch
import torch.nn.functional as F

from multimodal.eval.retrieval import retrieval_metrics


def brute_force(image, text, text_to_image, ks):
    """clip_benchmark's recall: a query hits at k when any positive is in its top k."""
    scores = text @ image.T  # (M, N)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text)), text_to_image] = True
    out = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = positive.gather(1, top_images).any(1).float().mean().item()
        top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        out[f"text_retrieval_recall@{k}"] = positive.T.gather(1, top_texts).any(1).float().mean().item()
    return out


def random_set(num_images, captions_per_image, dim, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    text_to_image = torch.arange(num_images).repeat_interleave(captions_per_image)
    text = F.normalize(image[text_to_image] + noise * torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    perm = torch.randperm(len(text_to_image), generator=g)  # captions in no particular order
    return image, text[perm], text_to_image[perm]


@pytest.mark.parametrize("num_images,per_image,chunk", [(50, 1, 7), (101, 5, 13), (64, 3, 1000), (37, 5, 1)])
def test_matches_brute_force(num_images, per_image, chunk):
    image, text, t2i = random_set(num_images, per_image, dim=16, seed=num_images)
    ks = (1, 5, 10)
    ours = retrieval_metrics(image, text, t2i, ks=ks, chunk_size=chunk)
    ref = brute_force(image, text, t2i, ks)
    for key, value in ref.items():
        assert ours[key] == value, key
    assert 0 < ours["image_retrieval_recall@1"] < 1  # a set where the metric is not trivially 0 or 1


def test_uneven_captions_per_image():
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    t2i = torch.tensor([i for i in range(20) for _ in range(1 + i % 4)])
    text = F.normalize(image[t2i] + torch.randn(len(t2i), 8, generator=g), dim=-1)
    ours = retrieval_metrics(image, text, t2i, ks=(1, 3), chunk_size=6)
    assert ours == pytest.approx({**ours, **brute_force(image, text, t2i, (1, 3))}, abs=0)


def test_ties_count_in_the_querys_favour():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t2i = torch.tensor([1, 2])
    m = retrieval_metrics(image, text, t2i, ks=(1,))
    # caption 0 ties between images 0 and 1: nothing scores strictly higher than its image.
    assert m["image_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_mean_rank"] == 1.0


def test_perfect_and_ranks():
    image = torch.eye(4)
    m = retrieval_metrics(image, image.clone(), torch.arange(4), ks=(1,))
    assert m["image_retrieval_recall@1"] == m["text_retrieval_recall@1"] == 1.0
    assert m["text_retrieval_median_rank"] == 1.0


def clip_benchmark_metrics(image, text, text_to_image, ks, batch_size=64):
    """clip_benchmark 1.6.2's own recall code, applied as its `evaluate` applies it to embeddings."""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    scores = text @ image.T
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores, positive_pairs, batch_size, "cpu",
                                                           k=k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu",
                                                          k=k) > 0).float().mean().item()
    return out


@pytest.mark.parametrize("num_images,per_image,chunk", [(500, 5, 128), (1000, 5, 333), (300, 1, 4096)])
def test_agrees_with_clip_benchmark_to_the_last_digit(num_images, per_image, chunk):
    image, text, t2i = random_set(num_images, per_image, dim=64, seed=7, noise=1.5)
    ks = (1, 5, 10)
    theirs = clip_benchmark_metrics(image, text, t2i, ks)
    ours = retrieval_metrics(image, text, t2i, ks=ks, chunk_size=chunk)
    assert {k: ours[k] for k in theirs} == theirs
