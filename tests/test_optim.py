import math

import pytest
import torch

from multimodal import arch
from multimodal.model import create_model
from multimodal.optim import param_groups, warmup_cosine


def test_no_decay_on_biases_norms_embeddings_and_logit_scale():
    model = create_model(arch.load("tiny"))
    decay, no_decay = param_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name, p in named.items():
        leaf = name.split(".")[-1]
        undecayed = (p.ndim < 2 or leaf in ("positional_embedding", "class_embedding", "logit_scale"))
        assert (id(p) in ids) == undecayed, name
    assert id(named["towers.logit_scale"]) in ids
    assert id(named["towers.visual.positional_embedding"]) in ids
    assert id(named["towers.visual.conv1.weight"]) not in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_flattened_parameters_decay_by_their_shapes_as_built():
    """FSDP flattens every parameter to 1-d and prefixes wrapped modules' names: the groups must
    still go by the shapes the model was built with."""
    model = create_model(arch.load("tiny"))
    ndims = {name: p.ndim for name, p in model.named_parameters()}
    expected = param_groups(model, weight_decay=0.2)

    class Flat(torch.nn.Module):  # what FSDP's named_parameters looks like, block by block
        def __init__(self):
            super().__init__()
            for name, p in model.named_parameters():
                wrapped = name.replace("resblocks.0.", "resblocks.0._fsdp_wrapped_module.")
                self.register_parameter(wrapped.replace(".", "__"), torch.nn.Parameter(p.detach().flatten()))

        def named_parameters(self, *args, **kwargs):
            for name, p in super().named_parameters(*args, **kwargs):
                yield name.replace("__", "."), p

    flat = Flat()
    assert not [p for p in flat.parameters() if p.ndim != 1]
    decay, no_decay = param_groups(flat, weight_decay=0.2, ndims=ndims)
    assert [p.numel() for p in decay["params"]] == [p.numel() for p in expected[0]["params"]]
    assert [p.numel() for p in no_decay["params"]] == [p.numel() for p in expected[1]["params"]]
    assert not param_groups(flat, weight_decay=0.2)[0]["params"]  # without them nothing would decay
