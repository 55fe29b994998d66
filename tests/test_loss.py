"""clip_loss and siglip_loss against direct references and open_clip's losses, their gradients, the clamp."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from multimodal.loss import LOSSES, clip_loss, siglip_loss


def features(n: int, d: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def reference_loss(image, text, scale):
    """Written from the definition: -log p(matching pair) in both directions, averaged."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        i2t = torch.stack([scale * image[i] @ text[j] for j in range(n)])
        t2i = torch.stack([scale * text[i] @ image[j] for j in range(n)])
        total = total - torch.log_softmax(i2t, 0)[i] - torch.log_softmax(t2i, 0)[i]
    return total / (2 * n)


@pytest.mark.parametrize("n,d,scale", [(1, 4, 1.0), (7, 16, 14.3), (32, 64, 100.0)])
def test_matches_reference(n, d, scale):
    image, text = features(n, d, seed=n)
    s = torch.tensor(scale)
    torch.testing.assert_close(clip_loss(image, text, s), reference_loss(image, text, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 16, 64])
def test_matches_open_clip(n):
    image, text = features(n, 32, seed=0)
    scale = torch.tensor(1 / 0.07)
    ours = clip_loss(image, text, scale)
    theirs = open_clip.loss.ClipLoss()(image, text, scale)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    g_ours = (image.grad.clone(), text.grad.clone())
    image.grad = text.grad = None
    theirs.backward()
    torch.testing.assert_close(g_ours, (image.grad, text.grad))


def test_gradients_match_reference_and_finite_differences():
    image, text = features(6, 8, seed=1, dtype=torch.float64)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(clip_loss(image, text, scale), (image, text, scale))
    ref = torch.autograd.grad(reference_loss(image, text, scale), (image, text, scale))
    torch.testing.assert_close(grads, ref)
    assert torch.autograd.gradcheck(clip_loss, (image, text, scale))


def test_perfect_alignment_and_temperature():
    image, _ = features(8, 16, seed=2)
    text = image.detach().clone()
    # Identical pairs: the loss falls towards 0 as the scale grows, is ln(n) at scale 0.
    assert clip_loss(image, text, torch.tensor(0.0)).item() == pytest.approx(math.log(8), rel=1e-6)
    assert clip_loss(image, text, torch.tensor(100.0)).item() < 1e-3


def siglip_reference(image, text, scale, bias):
    """Written from the definition: one binary log-likelihood per (image, text) pair."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(label * (scale * image[i] @ text[j] + bias))
    return total / n


@pytest.mark.parametrize("n,scale,bias", [(1, 10.0, -10.0), (9, 10.0, -10.0), (16, 3.0, 0.5)])
def test_siglip_matches_reference(n, scale, bias):
    image, text = features(n, 16, seed=n)
    s, b = torch.tensor(scale), torch.tensor(bias)
    torch.testing.assert_close(siglip_loss(image, text, s, b), siglip_reference(image, text, s, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 16, 64])
def test_siglip_matches_open_clip(n):
    image, text = features(n, 32, seed=3)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ours = siglip_loss(image, text, scale, bias)
    theirs = open_clip.loss.SigLipLoss()(image, text, scale, bias)
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.autograd.grad(ours, (image, text, scale, bias))
    g_theirs = torch.autograd.grad(theirs, (image, text, scale, bias))
    torch.testing.assert_close(g_ours, g_theirs)


def test_siglip_gradcheck():
    image, text = features(5, 8, seed=4, dtype=torch.float64)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(siglip_loss, (image, text, scale, bias))


def test_the_loss_chosen_by_name_is_the_function_and_starts_from_its_papers_scalars():
    """`model.loss` picks a callable once; it computes what open_clip's loss of the same kind does."""
    image, text = (F.normalize(torch.randn(8, 16), dim=-1) for _ in range(2))
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    clip, siglip = LOSSES["clip"](), LOSSES["siglip"]()
    assert torch.allclose(clip(image, text, scale, None, gather=False),
                          open_clip.loss.ClipLoss()(image, text, scale), atol=1e-6)
    assert torch.allclose(siglip(image, text, scale, bias, gather=False),
                          open_clip.loss.SigLipLoss()(image, text, scale, bias), atol=1e-5)
    assert (clip.init_logit_scale, clip.init_logit_bias) == (None, None)
    assert (siglip.init_logit_scale, siglip.init_logit_bias) == (math.log(10), -10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        siglip(image, text, scale, None)


def test_each_loss_declares_what_a_run_needs_and_builds_from_the_settings():
    """The recipe reads these declarations instead of comparing names: a caption decoder (CoCa's alone),
    gradient-cached micro-batches (not CoCa's decoder graph), and each loss's own settings."""
    assert {name: (kind.needs_caption_decoder, kind.supports_micro_batches) for name, kind in LOSSES.items()} == {
        "clip": (False, True), "siglip": (False, True), "coca": (True, False)}
    built = {name: kind.from_settings(caption_loss_weight=0.5) for name, kind in LOSSES.items()}
    assert all(type(loss) is LOSSES[name] for name, loss in built.items())
    assert built["coca"].caption_loss_weight == 0.5
