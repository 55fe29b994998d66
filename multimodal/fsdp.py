"""What FSDP needs of the two-tower model, applied from outside it (as torchtitan applies parallelism).

FSDP cannot shard 0-d parameters, and open_clip's `logit_scale` (and SigLIP's `logit_bias`) are 0-d.
`vectorise_scalars` gives them shape (1,) before the strategy wraps the model, and lets that model
load state dicts saved with either shape; `scalar_state` gives a saved state dict open_clip's shapes
back, so checkpoints and exports are the same under every strategy.
"""

import torch
from torch import nn

SCALARS = ("logit_scale", "logit_bias")


def vectorise_scalars(model: nn.Module) -> None:
    """In place: `model.towers`' temperature and bias of shape () become (1,). Values, gradients and
    the loss are unchanged."""
    for name in SCALARS:
        param = getattr(model.towers, name, None)
        if isinstance(param, nn.Parameter) and param.dim() == 0:
            setattr(model.towers, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
    model.register_load_state_dict_pre_hook(_match_scalar_shapes)


def scalar_state(state: dict[str, torch.Tensor]) -> None:
    """In place: the temperature and bias entries of a state dict to open_clip's shape ()."""
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in SCALARS and value.numel() == 1:
            state[key] = value.reshape(())


def _match_scalar_shapes(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a saved temperature or bias of shape () takes the model's (1,)."""
    for name in SCALARS:
        key, param = f"{prefix}towers.{name}", getattr(module.towers, name, None)
        if key in state and param is not None and {tuple(state[key].shape), tuple(param.shape)} == {(), (1,)}:
            state[key] = torch.reshape(state[key], param.shape)  # also loads a lazily loaded tensor
