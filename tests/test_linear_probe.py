"""The linear probe against CLIP_benchmark 1.6.2's own `linear_probe.evaluate` on the same features, its
behaviour on easy and hopeless labels, and the sentences bad input gets."""

import re
from contextlib import nullcontext

import pytest
import torch

from multimodal.errors import UserError
from multimodal.eval.linear_probe import probe

SETTINGS = {"lr": 0.1, "epochs": 2, "batch_size": 64, "seed": 3}


def clusters(sizes: tuple[int, ...], num_classes: int, seed: int, noise: float = 3.0, dim: int = 32):
    """Splits of `sizes` samples from the same Gaussian clusters around random centres: (n, dim) features,
    not normalised, and (n,) labels each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.randint(num_classes, (sum(sizes),), generator=g)
    features = centres[labels] + noise * torch.randn(sum(sizes), dim, generator=g)
    return list(zip(features.split(sizes), labels.split(sizes)))


class _Identity(torch.nn.Module):
    """A model whose "images" are already the features."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images


class _CpuCalledCuda(str):
    """'cpu' to torch, equal to 'cuda' for CLIP_benchmark's `assert device == 'cuda'`."""

    def __eq__(self, other):
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's `accuracy` with `.item()` for its `float(array of shape (1,))`, an error since NumPy 2.4."""
    correct = output.topk(max(topk), 1, True, True)[1].t().eq(target.view(1, -1))  # (k, N)
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_probe(monkeypatch, feature_root, train, test, val=None, val_proportion=None, fewshot_k=-1):
    """CLIP_benchmark's `evaluate` on CPU: it calls `.cuda()` and wraps models in DataParallel, which become
    no-ops here (amp is off, so autocast is one too). Loaders are lists of batches, so that featurising
    draws nothing from the RNG, and the RNG is seeded just before, as `probe` assumes."""
    lp = pytest.importorskip("clip_benchmark.metrics.linear_probe")
    monkeypatch.setattr(lp, "accuracy", _accuracy)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, device=None: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.nn, "DataParallel", lambda module, device_ids=None: module)
    monkeypatch.setattr(torch, "autocast", lambda device_type, enabled=True: nullcontext())
    size = SETTINGS["batch_size"]

    def batches(x, y):
        return list(zip(x.split(size), y.split(size)))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SETTINGS["seed"])
        if val_proportion is not None:  # as its CLI's --val_proportion splits the train set
            train_part, val_part = torch.utils.data.random_split(range(len(train[1])), [1 - val_proportion,
                                                                                         val_proportion])
            val = train[0][val_part.indices], train[1][val_part.indices]
            train = train[0][train_part.indices], train[1][train_part.indices]
        return lp.evaluate(_Identity(), batches(*train), batches(*test), fewshot_k, size, 0, SETTINGS["lr"],
                           SETTINGS["epochs"], "probe", SETTINGS["seed"], str(feature_root), _CpuCalledCuda("cpu"),
                           val_dataloader=batches(*val) if val is not None else None, normalize=True, amp=False)


# Measured: everything agrees to the last bit (weight decay, acc1, acc5, mean per-class recall): the same
# draws and the same float32 arithmetic on the same CPU. The seeds make the sweep end off its coarse points,
# at grid entries (57 and 81 of 97) where NumPy's logspace differs from `10 ** x` in the last bit.
@pytest.mark.filterwarnings("ignore:'pin_memory' argument")  # CLIP_benchmark's loaders pin memory; there is no GPU
@pytest.mark.parametrize("case,num_classes,seed", [
    ("validation", 6, 23),
    ("val_proportion_fewshot", 5, 25),  # 5 classes: acc5 is NaN, as CLIP_benchmark has it below label 5
    ("no_validation", 6, 1),
])
def test_agrees_with_clip_benchmark(case, num_classes, seed, monkeypatch, tmp_path):
    train, test, val = clusters((240, 200, 120), num_classes, seed=seed)
    kwargs = {"validation": {"val": val},
              "val_proportion_fewshot": {"val_proportion": 0.25, "fewshot_k": 20},
              "no_validation": {}}[case]
    theirs = clip_benchmark_probe(monkeypatch, tmp_path, train, test, **kwargs)
    val = kwargs.pop("val", (None, None))
    ours = probe(*train, *test, *val, **SETTINGS, **kwargs)
    assert 0.3 < ours["lp_acc1"] < 0.9  # neither trivial nor hopeless: the comparison means something
    assert str(ours) == str(theirs)  # every key, every digit; NaN as NaN


def test_separable_classes_are_learned_and_random_labels_are_not():
    train, test = clusters((300, 300), 6, seed=5, noise=0.1)
    assert probe(*train, *test, epochs=5)["lp_acc1"] == 1.0
    g = torch.Generator().manual_seed(7)
    noise, labels = torch.randn(900, 32, generator=g), torch.randint(6, (900,), generator=g)
    chance = probe(noise[:300], labels[:300], noise[300:], labels[300:], epochs=5)["lp_acc1"]
    assert abs(chance - 1 / 6) < 0.06  # 600 test samples: 4 standard deviations of chance


def test_the_caller_rng_is_left_alone():
    train, test = clusters((64, 32), 6, seed=8)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = probe(*train, *test, epochs=1, val_proportion=0.5)
    assert torch.equal(torch.rand(3), expected)
    assert probe(*train, *test, epochs=1, val_proportion=0.5) == first


@pytest.mark.parametrize("change,sentence", [
    (lambda t: {**t, "test_labels": torch.tensor([0, 1, 9, 2])}, "test label is 9"),
    (lambda t: {**t, "train_labels": torch.tensor([0, -1, 1, 2, 0, 1])}, "class ids must run from 0"),
    (lambda t: {**t, "train_features": torch.zeros(0, 8), "train_labels": torch.zeros(0, dtype=torch.long)},
     "training split is empty"),
    (lambda t: {**t, "train_labels": torch.tensor([0, 1, 2])}, "6 feature rows but 3 labels"),
    (lambda t: {**t, "test_features": torch.zeros(4, 5)}, "float (N, 8) matrix"),
    (lambda t: {**t, "train_labels": torch.zeros(6)}, "integer class ids"),
    (lambda t: {**t, "val_features": torch.zeros(2, 8)}, "both val_features and val_labels"),
    (lambda t: {**t, "fewshot_k": 3}, "class 0 has 2"),
    (lambda t: {**t, "fewshot_k": 0}, "fewshot_k is 0"),
    (lambda t: {**t, "val_proportion": 1.5}, "val_proportion 1.5"),
])
def test_bad_input_gets_one_sentence(change, sentence):
    good = {"train_features": torch.randn(6, 8), "train_labels": torch.tensor([0, 1, 2, 0, 1, 2]),
            "test_features": torch.randn(4, 8), "test_labels": torch.tensor([0, 1, 2, 2])}
    with pytest.raises(UserError, match=re.escape(sentence)) as error:
        probe(**change(good), epochs=1)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")
