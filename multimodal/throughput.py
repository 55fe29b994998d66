"""Throughput accounting: model FLOPs per sample, accelerator peaks, and step-time windows.

Model FLOPs utilisation (MFU, PaLM appendix B) is the FLOPs the model needs per second over the
accelerator's peak: the forward and backward FLOPs of one training sample, counted once with
torch's FLOP counter on a meta-device copy of the model, times samples per second per device, over the
peak. Recomputation (gradient checkpointing, the first pass of gradient caching) is not model
FLOPs and is not counted; patch dropout and locked towers are, as they change the work itself.
"""

import time
from collections import deque
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from multimodal.model import CLIP

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
# Vendor data sheets; the SXM figure for cards sold in several forms.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
}


def peak_tflops(device: torch.device) -> float | None:
    """The table's peak for a CUDA device, None when it is not a known GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def flops_per_sample(model: CLIP, loss_fn: Callable[[CLIP, torch.Tensor, torch.Tensor], torch.Tensor],
                     batch: int = 2) -> float:
    """Forward + backward FLOPs of one (image, text) training sample of `model`: `loss_fn(model, images,
    tokens)` is the loss of a batch (for `ContrastiveLoss`: the sum of its `terms`, a CoCa decoder included).

    The model is moved to the meta device: shapes only, no arithmetic, so that counting a ViT-L
    takes a second. Pass a copy.
    """
    model = model.to("meta").train()
    size = model.architecture.image_size
    images = torch.zeros(batch, 3, size, size, device="meta")
    tokens = model.architecture.tokenizer(["a photo of a thing"] * batch).to("meta")
    with FlopCounterMode(display=False) as counter:
        # backward(), not autograd.grad: the counter's module hooks refuse a leaf (CoCa's class token)
        # entering the graph by itself under autograd.grad; the copy's meta gradients are dropped with it
        loss_fn(model, images, tokens).backward()
    return counter.get_total_flops() / batch


class StepTimer:
    """Sliding-window means over the last `window` steps: samples/s and the fraction of time spent waiting
    for data (from the end of one step to the start of the next, when the loader hands over a batch).

    The first `warmup` steps are left out: the first step of a run allocates memory and, under
    `torch.compile`, compiles the towers for minutes, which is not the run's pace.
    """

    def __init__(self, window: int = 50, warmup: int = 0):
        self.steps: deque[tuple[float, float, int]] = deque(maxlen=window)  # (step time, wait, samples)
        self.last_start: float | None = None
        self.last_end: float | None = None
        self.to_skip = warmup

    def start(self, samples: int) -> None:
        now = time.perf_counter()
        if self.last_start is not None and self.last_end is not None:
            if self.to_skip > 0:
                self.to_skip -= 1
            else:
                self.steps.append((now - self.last_start, now - self.last_end, self.pending))
        self.last_start, self.pending = now, samples

    def end(self) -> None:
        self.last_end = time.perf_counter()

    def pause(self) -> None:
        """Leave out the time until the next start (validation, checkpointing between steps)."""
        self.last_start = self.last_end = None

    def rates(self) -> tuple[float, float] | None:
        """(samples per second, data-wait fraction) over the window; None before two steps."""
        if not self.steps:
            return None
        elapsed = sum(s[0] for s in self.steps)
        return sum(s[2] for s in self.steps) / elapsed, sum(s[1] for s in self.steps) / elapsed
