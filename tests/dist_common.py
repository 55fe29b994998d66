"""A small two-tower model and a fixed batch shared by the distributed test and its script."""

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 12


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Linear(10, 8)
        self.text = nn.Linear(6, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1),
                self.logit_scale.exp())


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 10, generator=g), torch.randn(BATCH, 6, generator=g)
