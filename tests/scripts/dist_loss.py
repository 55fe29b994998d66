"""Two gloo ranks under DDP: per-rank clip_loss on half of a batch each.

Usage: python dist_loss.py OUT.pt [world_size]. Writes the mean of the ranks' losses and every
parameter's gradient after DDP's averaging (checked equal on all ranks), for the test to compare
against one process on the whole batch. Run as a script: DDP must not re-launch pytest.
"""

import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from multimodal.loss import clip_loss  # noqa: E402
from tests.dist_common import BATCH, TwoTowers, batch  # noqa: E402


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = DistributedDataParallel(TwoTowers())
    images, texts = batch()
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = clip_loss(*model(images[local], texts[local]))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    for g in grads.values():  # every rank must hold the same averaged gradient
        reference = g.clone()
        dist.broadcast(reference, src=0)
        assert torch.equal(reference, g), "ranks disagree on a gradient"
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "rank_losses": torch.stack(losses), "grads": grads}, out)
    dist.destroy_process_group()


def main() -> None:
    out, world = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, out), nprocs=world, join=True)


if __name__ == "__main__":
    main()
