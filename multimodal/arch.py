"""Architectures by name: open_clip's built-in ones and the project's own JSON configs.

The project keeps small architectures as open_clip model JSON files in `configs/models/`
(`tiny` trains at hundreds of samples/s on two CPU cores). Any path to such a JSON file works
too. Resolving a name registers the file with open_clip, so that open_clip's own factories build
the towers, tokenizer and transforms for it exactly as they do for ViT-B-32.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torchvision.transforms.v2 as T2
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision.transforms import InterpolationMode

from multimodal.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the repository's configs/ (editable install)
MODEL_CONFIG_DIR = CONFIG_DIR / "models"


def project_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def resolve(name: str) -> str:
    """Return the open_clip name for `name`, registering project or file configs on the way."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"Model config file {name} does not exist: pass an existing open_clip model JSON.")
        open_clip.add_model_config(path)
        return path.stem
    project_file = MODEL_CONFIG_DIR / f"{name}.json"
    if project_file.is_file():
        open_clip.add_model_config(project_file)
        return name
    if name in open_clip.list_models():
        return name
    raise UserError(
        f"Unknown model '{name}': use an open_clip architecture such as ViT-B-32, ViT-B-16 or RN50, "
        f"one of the project's own ({', '.join(project_models())}), or a path to a model JSON file."
    )


def config(name: str) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg) for `name`."""
    return open_clip.get_model_config(resolve(name))


def image_size(name: str) -> int:
    size = config(name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def transforms(name: str):
    """open_clip's (train, val) image transforms for `name`: PIL image -> normalised (3, H, W)."""
    cfg = PreprocessCfg(size=image_size(name))
    return image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)


def train_pixels(name: str) -> Callable[[Image.Image | np.ndarray], torch.Tensor]:
    """open_clip's training crop, stopping at uint8: PIL image or (H, W, 3) array -> (3, H, W) uint8.

    The same RandomResizedCrop (scale 0.9-1, the same crop boxes for the same random state) as
    `transforms(name)[0]`, but resampled by torch's antialiased uint8 kernels, which are several
    times faster than PIL's and agree with them to a level or two in 255. Scaling to [0, 1] and
    normalising happen on the device (`normalize`): workers, pinned memory and the host-to-device
    copy move a quarter of the bytes of float32 pixels.
    """
    cfg = PreprocessCfg(size=image_size(name))
    interpolation = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[cfg.interpolation]
    size = [cfg.size, cfg.size] if isinstance(cfg.size, int) else list(cfg.size)
    crop = T2.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=interpolation, antialias=True)

    def pixels(image: Image.Image | np.ndarray) -> torch.Tensor:
        """A PIL image or an (H, W, 3) uint8 array (`pipeline.decode_jpeg_pixels`)."""
        if isinstance(image, Image.Image):
            image = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # writable: torch wants it so
        return crop(torch.from_numpy(image).permute(2, 0, 1))

    return pixels


def pixel_stats(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of open_clip's normalisation for `name`, shaped (1, 3, 1, 1), on the CPU."""
    cfg = PreprocessCfg(size=image_size(name))
    return torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)


def normalize(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 pixels -> float32 normalised as open_clip's transforms do: (x / 255 - mean) / std."""
    return pixels.float().mul_(1 / (255 * std)).sub_(mean / std)  # in place: one pass, one allocation


def tokenizer(name: str):
    """open_clip's tokenizer for `name`: list of strings -> (N, context_length) int64."""
    return open_clip.get_tokenizer(resolve(name))
