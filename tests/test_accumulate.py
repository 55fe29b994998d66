"""Gradient caching: k micro-batches of b give the loss and gradients of one batch of k x b."""

import math

import pytest
import torch

from multimodal import arch
from multimodal.accumulate import cached_step
from multimodal.loss import clip_loss, siglip_loss
from multimodal.model import create_model


def make(loss: str, patch_dropout: float | None = None):
    torch.manual_seed(0)
    tiny = arch.load("tiny")
    if loss == "siglip":
        model = create_model(tiny, init_logit_scale=math.log(10), init_logit_bias=-10.0, patch_dropout=patch_dropout)
        fn = lambda i, t: siglip_loss(i, t, model.logit_scale.exp(), model.logit_bias)  # noqa: E731
    else:
        model = create_model(tiny, patch_dropout=patch_dropout)
        fn = lambda i, t: clip_loss(i, t, model.logit_scale.exp())  # noqa: E731
    return model.train(), fn


def batch(n: int):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=g)
    words = ["red", "green", "blue", "square", "circle", "small", "large", "left", "right", "a", "two"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=g)) for _ in range(n)]
    return images, arch.load("tiny").tokenizer(texts)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("micro_batches", [2, 3])
def test_micro_batches_equal_one_large_batch(loss, micro_batches):
    model, fn = make(loss)
    images, texts = batch(12)
    reference = fn(model.encode_image(images), model.encode_text(texts))
    reference.backward()
    expected = grads(model)

    value, surrogate = cached_step(model, images, texts, fn, micro_batches)
    surrogate.backward()
    got = grads(model)
    torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys()
    assert "towers.logit_scale" in got and (loss != "siglip" or "towers.logit_bias" in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_patch_dropout_is_replayed_in_the_second_pass():
    """With random patch dropout the re-encoded micro-batch must drop the very same patches."""
    model, fn = make("clip", patch_dropout=0.5)
    images, texts = batch(8)
    torch.manual_seed(5)  # the reference draws its randomness in the same order: chunk by chunk
    features = [(model.encode_image(i), model.encode_text(t)) for i, t in zip(images.chunk(2), texts.chunk(2))]
    reference = fn(torch.cat([f[0] for f in features]), torch.cat([f[1] for f in features]))
    reference.backward()
    expected = grads(model)

    torch.manual_seed(5)
    value, surrogate = cached_step(model, images, texts, fn, 2)
    surrogate.backward()
    got = grads(model)
    torch.testing.assert_close(value, reference.detach(), rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plain_accumulation_is_not_the_large_batch_gradient():
    """The reason for caching: separate micro-batch losses give another gradient."""
    model, fn = make("clip")
    images, texts = batch(12)
    fn(model.encode_image(images), model.encode_text(texts)).backward()
    expected = grads(model)
    for i, t in zip(images.chunk(3), texts.chunk(3)):
        (fn(model.encode_image(i), model.encode_text(t)) / 3).backward()
    got = grads(model)
    assert not torch.allclose(got["towers.visual.proj"], expected["towers.visual.proj"], rtol=1e-3)


def test_frozen_parameters_get_no_gradient():
    model, fn = make("clip")
    model.towers.visual.requires_grad_(False)
    images, texts = batch(8)
    _, surrogate = cached_step(model, images, texts, fn, 2)
    surrogate.backward()
    assert all(p.grad is None for p in model.towers.visual.parameters())
    assert model.towers.token_embedding.weight.grad is not None


def test_indivisible_batch_is_an_error():
    model, fn = make("clip")
    images, texts = batch(2)
    with pytest.raises(ValueError, match="cannot be cut into 3"):
        cached_step(model, images, texts, fn, 3)
