"""Gathering features across ranks with gradients: the only user of torch.distributed.

`gather_features` is an all-gather whose backward sums the incoming gradients over ranks and
hands each rank the slice of its own features. With DDP averaging parameter gradients over W
ranks, the local-loss form of the contrastive loss then reproduces the single-process gradients
exactly (open_clip's `gather_with_grad` / `local_loss`, arXiv:2103.00020 appendix).
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.world, ctx.rank = dist.get_world_size(), dist.get_rank()
        out = local.new_empty((ctx.world * local.shape[0], *local.shape[1:]))
        dist.all_gather_single(out, local.contiguous())
        return out  # (W * B, D), rank r's rows at [r * B, (r + 1) * B)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            local = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
            dist.reduce_scatter_single(local, grad, op=dist.ReduceOp.SUM)
            return local
        # gloo has no reduce_scatter: all-reduce the whole gradient and keep our slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(ctx.world)[ctx.rank]


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, D) features of all ranks into (W * B, D), differentiably.

    Every rank must pass the same batch size B: the data pipeline guarantees it for training.
    """
    if not is_distributed():
        return features
    return _GatherWithGrad.apply(features)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]: picklable objects of any size (evaluation results)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, in place, as its element-wise maximum over all ranks. Nothing is read on the host:
    under NCCL the reduction is queued on the GPU stream like any kernel, so a step need not wait."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (the values themselves in one process). Reads
    the result on the host: a synchronisation point, for logging steps only."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
