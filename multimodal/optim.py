"""Parameter groups and learning-rate schedules for contrastive training.

Weight decay applies to weight matrices only. Biases, norm gains, the class-token and position
embeddings and `logit_scale` are left undecayed, as in CLIP and open_clip: decaying them pulls
gains and the temperature toward zero for no regularisation benefit.
"""

import math
from collections.abc import Iterable

from torch import nn

_NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "logit_scale", "logit_bias")


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def decays(name: str, ndim: int) -> bool:
    """Whether a parameter named `name` in its module, of `ndim` dimensions, takes weight decay."""
    if ndim < 2:  # biases, norm gains, class token, scalars
        return False
    return name.split(".")[-1] not in _NO_DECAY_NAMES


def original_name(name: str) -> str:
    """A parameter's name without the segments that FSDP, activation checkpointing or compile add."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_groups(model: nn.Module, weight_decay: float, ndims: dict[str, int] | None = None) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and everything else, trainable params only.

    `ndims`: each parameter's dimensions as built, by name. FSDP flattens parameters into 1-d
    shards, so a sharded model needs them to tell a weight matrix from a bias.
    """
    named: Iterable[tuple[str, nn.Parameter]] = (
        (n, p) for n, p in model.named_parameters() if p.requires_grad
    )
    decay, no_decay = [], []
    for name, param in named:
        ndim = ndims.get(original_name(name), param.ndim) if ndims else param.ndim
        (decay if decays(name, ndim) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over `warmup_steps`, then cosine to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
