import math

import pytest

from multimodal.model import create_model
from multimodal.optim import param_groups, warmup_cosine


def test_no_decay_on_biases_norms_embeddings_and_logit_scale():
    model = create_model("tiny")
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
