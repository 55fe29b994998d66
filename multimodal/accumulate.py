"""Contrastive batches larger than memory: gradient caching over micro-batches.

A contrastive loss couples every sample of the batch with every other, so plain gradient
accumulation over k micro-batches of b optimises k small-batch losses, not one loss over k x b.
Gradient caching (Gao et al. 2021, arXiv:2101.06983) recovers the large-batch gradient exactly:

1. encode every micro-batch without a graph and keep only its features;
2. compute the loss over all cached features (gathered across ranks as usual) and its gradient
   with respect to the features (and to the loss's own parameters, `logit_scale`, `logit_bias`);
3. re-encode each micro-batch with a graph, its random state restored so that patch dropout
   drops the same patches, and back-propagate the cached feature gradient through it alone:
   the other micro-batches enter this step as cached features, i.e. as fixed negatives.

The sum of step 3's parameter gradients is the gradient of the k x b loss: activations of one
micro-batch are alive at a time. The parameter gradients are summed with `torch.autograd.grad`
(which never fires DDP's hooks), and the step hands back a surrogate loss whose backward yields
exactly the summed gradient, so the caller's one backward, DDP's one all-reduce, AMP's scaler
and gradient clipping all work as for an ordinary step.
"""

from collections.abc import Callable

import torch

from multimodal.model import CLIP

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _RandomState:
    """The CPU and current-CUDA-device generator states, to replay a forward pass's randomness."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def cached_step(model: CLIP, images: torch.Tensor, texts: torch.Tensor, loss_fn: LossFn, micro_batches: int,
                grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss over the whole batch, surrogate to back-propagate) with `micro_batches` chunks in memory.

    `loss_fn(image_features, text_features)` computes the loss from the model's scalars (it reads
    `model.logit_scale` and the like itself). `grad_scale` multiplies the loss inside, for fp16
    AMP, where small feature gradients would otherwise underflow; it is divided out again.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    image_chunks, text_chunks = images.chunk(micro_batches), texts.chunk(micro_batches)
    if len(image_chunks) != micro_batches or len(text_chunks) != micro_batches:
        raise ValueError(f"A batch of {images.shape[0]} cannot be cut into {micro_batches} micro-batches.")

    # 1. Features of every micro-batch, no graph; the random state of each, to replay it.
    states, image_features, text_features = [], [], []
    with torch.no_grad():
        for image_chunk, text_chunk in zip(image_chunks, text_chunks):
            states.append(_RandomState(images.device))
            image_features.append(model.encode_image(image_chunk))
            text_features.append(model.encode_text(text_chunk))
    end_state = _RandomState(images.device)

    # 2. The loss over the whole batch and its gradient with respect to every feature.
    all_image = torch.cat(image_features).requires_grad_()
    all_text = torch.cat(text_features).requires_grad_()
    loss = loss_fn(all_image, all_text)
    grads = torch.autograd.grad(loss * grad_scale, [all_image, all_text, *params], allow_unused=True)
    image_grads, text_grads = grads[0].split([f.shape[0] for f in image_features]), grads[1].split(
        [f.shape[0] for f in text_features])
    summed = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[2:], params)]
    del all_image, all_text, image_features, text_features, grads

    # 3. Each micro-batch again, with a graph, back-propagating its cached feature gradients.
    for state, image_chunk, text_chunk, image_grad, text_grad in zip(
            states, image_chunks, text_chunks, image_grads, text_grads):
        state.restore()
        surrogate = ((model.encode_image(image_chunk) * image_grad).sum()
                     + (model.encode_text(text_chunk) * text_grad).sum())
        for total, g in zip(summed, torch.autograd.grad(surrogate, params, allow_unused=True)):
            if g is not None:
                total.add_(g)
    end_state.restore()

    # A linear function of the parameters whose gradient is the summed gradient.
    surrogate = sum((p * (g / grad_scale).to(p.dtype)).sum() for p, g in zip(params, summed))
    return loss.detach(), surrogate
