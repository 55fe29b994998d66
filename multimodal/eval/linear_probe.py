"""Linear probe: a linear classifier trained on frozen image features, as CLIP_benchmark's `linear_probe`
task trains it (clip_benchmark 1.6.2, clip_benchmark/metrics/linear_probe.py), over feature tensors.

One `nn.Linear` is trained with AdamW, a cosine learning rate without warm-up and cross-entropy, on
shuffled batches. With a validation split, the weight decay is chosen from logspace(-6, 2, 97) by CLIP's
sweep (Radford et al. 2021, appendix A.3, https://arxiv.org/abs/2103.00020): 7 coarse points, then a
binary refinement around the best; the final model then trains on train + validation (all shots) or on
the few-shot train set alone. Without a validation split there is no sweep: the weight decay is 0.

Given the same features and seed, the result is CLIP_benchmark's up to floating point: the same
initialisation, batch order, few-shot selection, weight-decay grid and tie-breaking. CLIP_benchmark draws
those from the global RNG, seeded in `train` but not before the few-shot draw or its CLI's
`--val_proportion` split; here one generator seeded with `seed` makes both, as CLIP_benchmark does when
the global RNG is seeded with `seed` just before the split (or, without one, before `evaluate`) and its
features are already cached. The caller's RNG state is left as it was.

NumPy computes the grid, the schedule and the mean recall because CLIP_benchmark does: its
`np.logspace` differs from `10 ** x` in the last bit on some CPUs (SVML), and the chosen weight decay
should be the very number CLIP_benchmark reports.
"""

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from multimodal.errors import UserError


def probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
          test_labels: torch.Tensor, val_features: torch.Tensor | None = None, val_labels: torch.Tensor | None = None,
          *, lr: float = 0.1, epochs: int = 10, batch_size: int = 64, seed: int = 0, normalize: bool = True,
          fewshot_k: int = -1, val_proportion: float | None = None,
          progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Test accuracy of a linear probe on (N, D) image features with (N,) integer labels.

    Defaults are CLIP_benchmark's CLI defaults (`--fewshot_lr`, `--fewshot_epochs`, `--batch_size`,
    `--seed`, `--normalize`, `--fewshot_k`). `normalize` L2-normalises every split's features first.
    `fewshot_k` keeps k random training samples a class (-1: all). Without `val_features`,
    `val_proportion` splits that share off the training set for the weight-decay sweep, as
    CLIP_benchmark's `--val_proportion` does. Training runs where `train_features` live. `progress`
    receives a line per weight decay tried.

    Returns CLIP_benchmark's keys: lp_acc1, lp_acc5 (NaN when the test labels stop below 5, as
    there), lp_mean_per_class_recall, weight_decay, epochs, seed, fewshot_k, normalized.
    """
    _check_settings(lr, epochs, batch_size, fewshot_k, val_proportion, val_features, val_labels)
    generator = torch.Generator().manual_seed(seed)
    splits = _prepared({"training": (train_features, train_labels), "test": (test_features, test_labels),
                        "validation": (val_features, val_labels)}, normalize, val_proportion, generator)
    train_x, train_y = splits["training"]
    num_classes = int(train_y.max()) + 1
    keep = _fewshot(train_y, fewshot_k, generator)
    train_x, train_y = train_x[keep], train_y[keep]

    def fit(x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.nn.Linear:
        return _train(x, y, num_classes, weight_decay, lr, epochs, batch_size, seed)

    if "validation" not in splits:
        weight_decay = 0  # an int, as CLIP_benchmark reports it
    else:
        val_x, val_y = splits["validation"]

        def val_acc1(weight_decay: float) -> float:
            logits = _logits(fit(train_x, train_y, weight_decay), val_x, batch_size)
            acc1 = int((logits.topk(1, dim=1).indices[:, 0] == val_y).sum()) / len(val_y)
            if progress is not None:
                progress(f"weight decay {weight_decay:.3g}: validation acc1 {acc1:.4f}")
            return acc1

        weight_decay = _sweep(val_acc1)
        if fewshot_k < 0:  # more data than the k shots asked for otherwise
            train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    head = fit(train_x, train_y, weight_decay)
    metrics = _metrics(_logits(head, splits["test"][0], batch_size), splits["test"][1])
    return {"lp_acc1": metrics[0], "lp_acc5": metrics[1], "lp_mean_per_class_recall": metrics[2],
            "weight_decay": weight_decay, "epochs": epochs, "seed": seed, "fewshot_k": fewshot_k,
            "normalized": normalize}


def _check_settings(lr: float, epochs: int, batch_size: int, fewshot_k: int, val_proportion: float | None,
                    val_features: torch.Tensor | None, val_labels: torch.Tensor | None) -> None:
    if not lr > 0 or epochs < 1 or batch_size < 1:
        raise UserError(f"The linear probe needs lr > 0, epochs >= 1 and batch_size >= 1, not lr={lr}, "
                        f"epochs={epochs}, batch_size={batch_size}.")
    if fewshot_k == 0 or fewshot_k < -1:
        raise UserError(f"fewshot_k is {fewshot_k}: pass a number of samples per class, or -1 for all of them.")
    if (val_features is None) != (val_labels is None):
        raise UserError("Pass both val_features and val_labels for a validation split, or neither.")
    if val_proportion is not None and (val_features is not None or not 0 < val_proportion < 1):
        raise UserError(f"val_proportion {val_proportion} must lie between 0 and 1, and only applies "
                        "when no validation features are given.")


def _prepared(splits: dict[str, tuple], normalize: bool, val_proportion: float | None,
              generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The checked (normalised) features and labels of each split given, on the training features' device,
    with the validation split shared off the training set when `val_proportion` asks for it."""
    train_features = splits["training"][0]
    splits = {name: _checked(name, x, y, train_features.shape[-1], train_features.device)
              for name, (x, y) in splits.items() if x is not None}
    if normalize:
        splits = {name: (F.normalize(x, dim=-1), y) for name, (x, y) in splits.items()}
    if val_proportion is not None:
        splits["training"], splits["validation"] = _split(*splits["training"], val_proportion, generator)
    top = int(splits["training"][1].max())
    for name in ("validation", "test"):
        if name in splits and int(splits[name][1].max()) > top:
            raise UserError(f"A {name} label is {int(splits[name][1].max())}, but the training labels only "
                            f"reach {top}: a linear probe cannot predict a class it never saw.")
    return splits


def _checked(name: str, features: torch.Tensor, labels: torch.Tensor, dim: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's (N, D) float features and (N,) int64 labels on `device`, or one sentence saying what is wrong."""
    if features.ndim != 2 or features.shape[1] != dim or not features.is_floating_point():
        raise UserError(f"The {name} features must be a float (N, {dim}) matrix, not {features.dtype} of shape "
                        f"{tuple(features.shape)}.")
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise UserError(f"The {name} labels must be a 1-D tensor of integer class ids, not {labels.dtype} of "
                        f"shape {tuple(labels.shape)}.")
    if len(features) != len(labels):
        raise UserError(f"The {name} split has {len(features)} feature rows but {len(labels)} labels: pass one "
                        "label per row.")
    if len(labels) == 0:
        raise UserError(f"The {name} split is empty: the linear probe needs at least one sample in it.")
    if int(labels.min()) < 0:
        raise UserError(f"A {name} label is {int(labels.min())}: class ids must run from 0.")
    if not torch.isfinite(features).all():
        raise UserError(f"The {name} features hold NaN or infinite values: check the model that embedded them.")
    return features.float().to(device), labels.long().to(device)


def _split(features: torch.Tensor, labels: torch.Tensor, proportion: float, generator: torch.Generator):
    """`torch.utils.data.random_split(train, [1 - proportion, proportion], generator)`, as tensors."""
    n = len(labels)
    lengths = [math.floor(n * (1 - proportion)), math.floor(n * proportion)]
    for i in range(n - sum(lengths)):
        lengths[i % 2] += 1
    if 0 in lengths:
        raise UserError(f"val_proportion {proportion} of {n} training samples leaves one split empty: "
                        "choose a proportion that keeps samples on both sides.")
    order = torch.randperm(n, generator=generator).to(features.device)
    train, val = order[:lengths[0]], order[lengths[0]:]
    return (features[train], labels[train]), (features[val], labels[val])


def _fewshot(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the first k samples of each class in a random order (all samples, in that order, for k = -1)."""
    order = torch.randperm(len(labels), generator=generator)
    if k < 0:
        return order.to(labels.device)
    counts: dict[int, int] = {}
    keep = []
    for i, label in zip(order.tolist(), labels.cpu()[order].tolist()):
        counts[label] = counts.get(label, 0) + 1
        if counts[label] <= k:
            keep.append(i)
    short = {c: n for c, n in counts.items() if n < k}
    if short:
        c = min(short)
        raise UserError(f"fewshot_k={k} needs {k} training samples of every class, but class {c} has "
                        f"{short[c]}: lower fewshot_k.")
    return torch.tensor(keep, device=labels.device)


def _epoch_order(n: int) -> torch.Tensor:
    """A shuffling DataLoader's permutation, drawn from the global RNG as its iterator draws it: first the
    workers' base seed (unused here), then the RandomSampler's seed."""
    torch.empty((), dtype=torch.int64).random_()
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _train(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, lr: float,
           epochs: int, batch_size: int, seed: int) -> torch.nn.Linear:
    """CLIP_benchmark's `train`: its initialisation and batch order come from the CPU RNG seeded with `seed`,
    here in a fork of it."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        head = torch.nn.Linear(features.shape[1], num_classes)
        orders = [_epoch_order(len(labels)) for _ in range(epochs)]
    head = head.to(features.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / batch_size)
    step = 0
    for order in orders:
        for batch in order.to(features.device).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * lr  # float64, as CLIP_benchmark's
            optimizer.zero_grad()
            F.cross_entropy(head(features[batch]), labels[batch]).backward()  # (B, C) logits
            optimizer.step()
            step += 1
    return head


@torch.no_grad()
def _logits(head: torch.nn.Linear, features: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([head(chunk) for chunk in features.split(batch_size)])  # (N, C)


def _sweep(val_acc1: Callable[[float], float]) -> float:
    """The weight decay of CLIP's sweep: the best of 7 coarse points of the 97, then of the points 8, 4, 2
    and 1 steps to either side. As in CLIP_benchmark, the first of equals wins, and a round whose
    accuracies are all 0 falls back to the grid's first point. Each point trains once: training is
    deterministic, so CLIP_benchmark's retraining of the peak gives the same accuracy."""
    grid = np.logspace(-6, 2, num=97).tolist()
    coarse = np.logspace(-6, 2, num=7).tolist()
    accuracies: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best, best_acc = 0, 0.0
        for i in candidates:
            if i not in accuracies:
                accuracies[i] = val_acc1(grid[i])
            if best_acc < accuracies[i]:
                best, best_acc = i, accuracies[i]
        return best

    best = peak([i for i, wd in enumerate(grid) if wd in coarse])
    for span in (8, 4, 2, 1):
        best = peak([max(best - span, 0), best, min(best + span, len(grid) - 1)])
    return grid[best]


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """acc1, acc5 and mean per-class recall as CLIP_benchmark computes them: accuracies from `topk`, the
    recall (sklearn's balanced accuracy) from `argmax`, over the classes present in `labels`."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    acc1 = int((top[:, 0] == labels).sum()) / len(labels)
    acc5 = int((top == labels[:, None]).any(1).sum()) / len(labels) if int(labels.max()) >= 5 else float("nan")
    predicted = logits.argmax(1)
    recalls = [int((predicted[labels == c] == c).sum()) / int((labels == c).sum()) for c in labels.unique().tolist()]
    return acc1, acc5, float(np.mean(recalls))
