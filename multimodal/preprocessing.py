"""How images become a model's input, as plain numbers: what its weights were trained with.

The model layer says them (`arch.Architecture.preprocessing`, from open_clip's config and a pretrained
tag's); the data layer builds its transforms from them (`data.pixels.TrainCrop.of`, `EvalTransform.of`,
`OpenClipEvalTransform`). This module imports nothing, so that neither layer imports the other.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    size: int  # the square input's side, in pixels
    mean: tuple[float, float, float]  # per-channel statistics of pixels scaled to [0, 1]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # or "bilinear"
    resize_mode: str = "shortest"  # evaluation: the shorter side to `size`, then the centre; "squash": whole
