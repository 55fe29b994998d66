"""The local-loss form over two gloo ranks equals one process on the concatenated batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal.loss import clip_loss
from tests.dist_common import TwoTowers, batch

SCRIPT = Path(__file__).parent / "scripts" / "dist_loss.py"


@pytest.mark.parametrize("world", [2, 3])
def test_two_rank_loss_and_gradients_equal_single_process(tmp_path, world):
    out = tmp_path / "dist.pt"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(world)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = torch.load(out, weights_only=True)

    model = TwoTowers()
    loss = clip_loss(*model(*batch()))
    loss.backward()
    torch.testing.assert_close(dist["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(dist["rank_losses"][0], dist["rank_losses"][1])  # ranks saw different rows
    for name, param in model.named_parameters():
        torch.testing.assert_close(dist["grads"][name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
