"""A small two-tower model, a fixed batch and the losses shared by the distributed test and its script."""

import torch
import torch.nn.functional as F
from torch import nn

from multimodal.loss import clip_loss, siglip_loss

BATCH = 12


class TwoTowers(nn.Module):
    """Linear towers with `logit_scale` (and SigLIP's `logit_bias` with `bias`), as `multimodal.model.CLIP`."""

    def __init__(self, bias: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Linear(10, 8)
        self.text = nn.Linear(6, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if bias else None

    def encode_image(self, images):
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, texts):
        return F.normalize(self.text(texts), dim=-1)

    def forward(self, images, texts):
        return self.encode_image(images), self.encode_text(texts)


def loss_fn(model: TwoTowers, kind: str):
    """The loss of `kind` ('clip' or 'siglip') as a function of features, reading the model's scalars."""
    if kind == "siglip":
        return lambda i, t: siglip_loss(i, t, model.logit_scale.exp(), model.logit_bias)
    return lambda i, t: clip_loss(i, t, model.logit_scale.exp())


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 10, generator=g), torch.randn(BATCH, 6, generator=g)
