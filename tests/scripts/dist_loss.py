"""W gloo ranks under DDP, each with its share of one batch: the loss and gradients of the whole.

Usage: python dist_loss.py OUT_DIR WORLD_SIZE KIND:MICRO_BATCHES [...], KIND clip or siglip. For each
case, in one process group (process start-up is most of the cost), writes OUT_DIR/KIND-MICRO_BATCHES.pt:
the mean of the ranks' losses, every parameter's gradient after DDP's averaging (checked equal on all
ranks) and each rank's ungathered loss on the whole batch, for the test to compare against one process
on that batch. With micro_batches > 1 each rank takes its share in gradient-cached micro-batches
(`multimodal.accumulate.cached_step`), inside the DDP forward as in the Lightning module.
Run as a script: DDP must not re-launch pytest.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from multimodal.accumulate import cached_step  # noqa: E402
from multimodal.loss import clip_loss, siglip_loss  # noqa: E402
from tests.dist_common import BATCH, TwoTowers, batch, loss_fn  # noqa: E402


class Step(nn.Module):
    """What DDP wraps: the towers and one training step's loss (and the surrogate to back-propagate)."""

    def __init__(self, kind: str, micro_batches: int):
        super().__init__()
        self.towers = TwoTowers(bias=kind == "siglip")
        self.fn, self.micro_batches = loss_fn(self.towers, kind), micro_batches

    def forward(self, images, texts):
        if self.micro_batches > 1:
            return cached_step(self.towers, images, texts, self.fn, self.micro_batches)
        loss = self.fn(*self.towers(images, texts))
        return loss.detach(), loss


def worker(rank: int, world: int, port: int, out: str, cases: list[tuple[str, int]]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for kind, micro_batches in cases:
        case(rank, world, kind, micro_batches, os.path.join(out, f"{kind}-{micro_batches}.pt"))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's worker threads can still hold tensors then and abort
    # the process ("terminate called without an active exception", pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def case(rank: int, world: int, kind: str, micro_batches: int, out: str) -> None:
    model = DistributedDataParallel(Step(kind, micro_batches))
    towers = model.module.towers
    images, texts = batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss, surrogate = model(images[local], texts[local])
    surrogate.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss)
    with torch.no_grad():  # gather=False scores a rank's batch alone, whatever its rank
        features = towers(images, texts)
        if kind == "siglip":
            alone = siglip_loss(*features, towers.logit_scale.exp(), towers.logit_bias, gather=False)
        else:
            alone = clip_loss(*features, towers.logit_scale.exp(), gather=False)
    alones = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(alones, alone)
    grads = {n: p.grad for n, p in towers.named_parameters()}
    for g in grads.values():  # every rank must hold the same averaged gradient
        reference = g.clone()
        dist.broadcast(reference, src=0)
        assert torch.equal(reference, g), "ranks disagree on a gradient"
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "rank_losses": torch.stack(losses),
                    "alone": torch.stack(alones), "grads": grads}, out)


def main() -> None:
    out, world = sys.argv[1], int(sys.argv[2])
    cases = [(kind, int(micro_batches)) for kind, micro_batches in (arg.split(":") for arg in sys.argv[3:])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, out, cases), nprocs=world, join=True)


if __name__ == "__main__":
    main()
