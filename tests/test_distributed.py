"""The local-loss forms over 2 and 3 gloo ranks equal one process on the concatenated batch:
clip_loss and siglip_loss, in one pass and in gradient-cached micro-batches."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_common import TwoTowers, batch, loss_fn

SCRIPT = Path(__file__).parent / "scripts" / "dist_loss.py"


CASES = {2: [("clip", 1), ("siglip", 1), ("clip", 3), ("siglip", 2)], 3: [("clip", 1), ("siglip", 1)]}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """world size -> the folder of the script's results, each world's cases run in one launch."""
    folders = {}
    for world, cases in CASES.items():
        folders[world] = tmp_path_factory.mktemp(f"world{world}")
        proc = subprocess.run([sys.executable, str(SCRIPT), str(folders[world]), str(world),
                               *(f"{kind}:{micro_batches}" for kind, micro_batches in cases)],
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return folders


@pytest.mark.parametrize("world,kind,micro_batches", [(w, *case) for w, cases in CASES.items() for case in cases])
def test_ranks_loss_and_gradients_equal_single_process(ranks, world, kind, micro_batches):
    dist = torch.load(ranks[world] / f"{kind}-{micro_batches}.pt", weights_only=True)

    model = TwoTowers(bias=kind == "siglip")
    loss = loss_fn(model, kind)(*model(*batch()))
    loss.backward()
    torch.testing.assert_close(dist["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dist["rank_losses"][0], dist["rank_losses"][1])  # ranks saw different rows
    for alone in dist["alone"]:  # gather=False on any rank: the plain loss of the batch it is given
        torch.testing.assert_close(alone, loss.detach(), rtol=1e-6, atol=1e-6)
    names = dict(model.named_parameters())
    assert dist["grads"].keys() == names.keys()
    for name, param in names.items():
        torch.testing.assert_close(dist["grads"][name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
