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


_host_group: tuple | None = None  # (the world group it was made for, a gloo group over the same ranks)


def host_group():
    """A gloo group over all ranks for values that live on the host (flags, timers, small objects): its
    collectives never touch a device. Made on the first call after each `init_process_group` (a collective:
    every rank makes that first call at the same point, as callbacks' hooks do), then shared."""
    global _host_group
    world = dist.group.WORLD
    if _host_group is None or _host_group[0] is not world:
        _host_group = (world, dist.new_group(backend="gloo"))
    return _host_group[1]


class HostVote:
    """A flag any rank may raise, agreed by all ranks one call late, on the host (issue 9: a step reads no
    device value): each call all-reduces this call's flag over `host_group` in the background and returns
    the previous call's result, so that the reduction of step s runs while step s + 1 trains. In one process
    a call returns its own flag at once. Every rank makes the same calls in the same order (once a step);
    after a call that returns True the next starts afresh and returns False."""

    def __init__(self):
        self._group = host_group() if is_distributed() else None
        self._pending: tuple | None = None  # (the flag being reduced, its work)

    def __call__(self, raised: bool) -> bool:
        if self._group is None:
            return raised
        agreed = self._collect()
        if not agreed:
            flag = torch.tensor([int(raised)], dtype=torch.int32)
            self._pending = (flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True))
        return agreed

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        (flag, work), self._pending = self._pending, None
        work.wait()
        return bool(flag.numpy()[0])  # numpy's view: no `.item()`, which a step must not call

    def close(self) -> None:
        """Waits for the reduction in flight (all ranks call it at the same point, as at the end of training)."""
        self._collect()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] over `host_group`: picklable objects, no device."""
        if self._group is None:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def barrier(self) -> None:
        if self._group is not None:
            dist.barrier(group=self._group)
