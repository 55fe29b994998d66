"""Pixels for the model: crop boxes, resampling to its input size, normalisation.

Training (open_clip's RandomResizedCrop, scale 0.9-1, bicubic): each sample's box is drawn in the
pixels of the full-size image, whose size its header gives, as RandomResizedCrop draws it on a
full-size PIL image, from the sample's own seed. Two places turn the JPEG bytes and the box into
(3, S, S) uint8 pixels:

- a DataLoader worker (`data.decode: cpu`): libjpeg-turbo decodes at the smallest DCT scale n/8
  that keeps both sides at least S (`decode.decode_jpeg_pixels`), the box is scaled with it, and
  torch's antialiased bicubic kernel resamples the crop;
- the training device (`data.decode: gpu`): the worker sends the bytes and the box; the batch's JPEGs
  are decoded together by `torchvision.io.decode_jpeg(device=...)` (nvJPEG on CUDA, libjpeg-turbo on
  the CPU) at full size (`batch.finish`), and each is cropped with its box and resampled by the same
  kernel there.

The two agree to within the resolution the worker decoded at (tests/test_decode.py states the
tolerance). Evaluation (open_clip's eval transform: shorter side resized to S, bicubic, centre crop)
is `EvalTransform`, from DCT-scaled pixels too; `OpenClipEvalTransform` is open_clip's own, for figures
equal to CLIP_benchmark's. Normalisation always happens on the device (`normalize`): uint8 pixels are a
quarter of float32's bytes in workers, pinned memory and copies.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multimodal.preprocessing import Preprocessing

Box = tuple[int, int, int, int]  # (top, left, height, width), in pixels of the image it applies to


MAX_ASPECT = 4  # evaluation keeps at most the middle 4:1 of longer images (the centre crop is 1:1)
# open_clip's own transform resizes whole images: the same up to this aspect (a 1 x 10^5 image would
# become 224 x 2 * 10^7 pixels on the way), only the middle beyond it
EXACT_MAX_ASPECT = 100


def middle(width: int, height: int, max_aspect: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the middle `max_aspect`:1 of a longer image; None when it is not longer."""
    if max(width, height) <= max_aspect * min(width, height):
        return None
    keep = max_aspect * min(width, height)
    return ((width - keep) // 2, 0, (width + keep) // 2, height) if width > height else \
        (0, (height - keep) // 2, width, (height + keep) // 2)


class Draws(Protocol):
    """Where random boxes come from: `random.Random`, or torch's generator in torchvision's order."""

    def uniform(self, a: float, b: float) -> float: ...

    def randint(self, a: int, b: int) -> int: ...


def chw(image: "np.ndarray | Image.Image | torch.Tensor") -> torch.Tensor:
    """(3, H, W) uint8 from a PIL image, an (H, W, 3) uint8 array (our decoders' arrays are writable,
    as torch wants them) or a (3, H, W) tensor, which is returned as it is."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB") if image.mode != "RGB" else image)
    return torch.from_numpy(image).permute(2, 0, 1) if isinstance(image, np.ndarray) else image


@dataclass(frozen=True)
class TrainCrop:
    """open_clip's training crop (RandomResizedCrop) to `size` x `size`, as boxes and resampling."""

    size: int
    mode: str = "bicubic"
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def of(cls, preprocessing: Preprocessing) -> "TrainCrop":
        """The training crop of a model's preprocessing: its size and interpolation."""
        return cls(preprocessing.size, mode=preprocessing.interpolation)

    def box(self, width: int, height: int, rng: Draws) -> Box:
        """A random box of a `width` x `height` image, as RandomResizedCrop draws it (the Inception crop,
        Szegedy et al. 2015, in torchvision's arithmetic): an area fraction uniform in `scale` and an
        aspect ratio log-uniform in `ratio`, up to ten tries to fit, else the centre crop of the nearest
        allowed ratio. `rng.uniform(a, b)` and `rng.randint(a, b)` (both ends included) draw: the
        sample's own `random.Random` in training; given torch's draws, the same boxes as torchvision."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        if width / height < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif width / height > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def pixels(self, image: "np.ndarray | Image.Image | torch.Tensor", box: Box,
               full_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(3, size, size) uint8: `box` of the full-size image, cut from `image` and resampled.

        `image` is (H, W, 3) uint8 (an array or a PIL image) or (3, H, W) uint8 on any device. When it
        was decoded smaller than the full image (`full_size`, (width, height)), the box is scaled too.
        """
        image = chw(image)
        if full_size is not None:
            box = scale_box(box, full_size, (image.shape[2], image.shape[1]))
        top, left, height, width = box
        return resize(image[:, top:top + height, left:left + width], (self.size, self.size), self.mode)


def scale_box(box: Box, full_size: tuple[int, int], decoded_size: tuple[int, int]) -> Box:
    """`box` of a full_size (width, height) image in the pixels of the same image decoded at decoded_size."""
    (full_w, full_h), (w, h) = full_size, decoded_size
    top, left, height, width = box
    fy, fx = h / full_h, w / full_w
    # each edge rounded on its own: no edge moves by more than half a decoded pixel
    top, bottom = min(round(top * fy), h - 1), min(round((top + height) * fy), h)
    left, right = min(round(left * fx), w - 1), min(round((left + width) * fx), w)
    return top, left, max(1, bottom - top), max(1, right - left)


def resize(pixels: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """(3, h, w) uint8 -> (3, H, W) uint8, antialiased. torch resamples uint8 natively on the CPU
    (as torchvision's transforms do); elsewhere it goes through float32 and is rounded back."""
    if pixels.device.type == "cpu":
        return F.interpolate(pixels[None], size=size, mode=mode, antialias=True)[0]
    out = F.interpolate(pixels[None].float(), size=size, mode=mode, antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class EvalTransform:
    """open_clip's eval transform in two halves: `pixels` (shorter side resized to `size`, bicubic,
    centre crop: torchvision's Resize and CenterCrop arithmetic; or, with `resize_mode="squash"` as SigLIP
    and CLIPA weights expect, the whole image resized to `size` x `size`) up to uint8, on the CPU, in the
    loader's workers; `normalize` on the device where the batch is encoded. `__call__` does both, for one
    image."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "bicubic"
    resize_mode: str = "shortest"  # or "squash"

    @classmethod
    def of(cls, preprocessing: Preprocessing) -> "EvalTransform":
        """The eval transform of a model's preprocessing: open_clip's, in two halves."""
        p = preprocessing
        return cls(p.size, p.mean, p.std, mode=p.interpolation, resize_mode=p.resize_mode)

    def pixels(self, image: "np.ndarray | Image.Image") -> torch.Tensor:
        """(3, size, size) uint8 from (H, W, 3) uint8 (an array or a PIL image), decoded at any size
        whose shorter side is at least `size` (`decode.decode_image(data, min_side=size)`)."""
        pixels = chw(image)
        if self.resize_mode == "squash":
            return resize(pixels, (self.size, self.size), self.mode)
        box = middle(pixels.shape[2], pixels.shape[1], MAX_ASPECT)  # a 1 x 10^7 image must not become 224 x 10^9
        if box is not None:
            left, top, right, bottom = box
            pixels = pixels[:, top:bottom, left:right]
        h, w = pixels.shape[1:]
        new_long = int(self.size * max(h, w) / min(h, w))
        new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
        pixels = resize(pixels, (new_h, new_w), self.mode)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return pixels[:, top:top + self.size, left:left + self.size]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float32 normalised, on the pixels' device."""
        return normalize(pixels, self.mean, self.std)

    @property
    def decode_side(self) -> int:
        """The shortest side an image need be decoded at for `pixels` (a JPEG's DCT scaling)."""
        return self.size

    def __call__(self, image: "np.ndarray | Image.Image") -> torch.Tensor:
        return self.normalize(self.pixels(image)[None])[0]


class OpenClipEvalTransform:
    """open_clip's own eval transform, run as it is (`--preprocess open_clip`): full-size PIL images in
    (`decode_side` None), and out the normalised float32 pixels that `open_clip.image_transform(...,
    is_train=False)` gives for the same statistics, resize mode and interpolation: PIL's resampling of the
    whole image, as CLIP_benchmark feeds the same weights (but for images longer than 100:1, whose middle
    100:1 is kept: memory stays bounded). Slower than `EvalTransform` (and its workers hand over 4x the
    bytes), which agrees with it to within a tolerance `tests/test_benchmarks.py` states."""

    decode_side = None

    def __init__(self, preprocessing: Preprocessing):
        import open_clip

        p = preprocessing
        self.size, self.mean, self.std, self.resize_mode = p.size, p.mean, p.std, p.resize_mode
        self.transform = open_clip.image_transform(p.size, is_train=False, mean=p.mean, std=p.std,
                                                   resize_mode=p.resize_mode, interpolation=p.interpolation)

    def pixels(self, image: "np.ndarray | Image.Image") -> torch.Tensor:
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        box = middle(*image.size, EXACT_MAX_ASPECT) if self.resize_mode == "shortest" else None
        return self.transform(image.crop(box) if box is not None else image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Already normalised by `pixels`."""
        return pixels

    def __call__(self, image: "np.ndarray | Image.Image") -> torch.Tensor:
        return self.pixels(image)


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(B, 3, H, W) uint8 pixels -> float32 normalised as open_clip's transforms do: (x / 255 - mean) / std.
    Channel by channel with Python numbers: no statistics tensor to copy to the device, one allocation."""
    out = pixels.float()
    for c, (m, s) in enumerate(zip(mean, std)):
        out[:, c].mul_(1 / (255 * s)).sub_(m / s)
    return out
