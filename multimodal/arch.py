"""Architectures by name: open_clip's built-in ones and the project's own JSON configs.

The project keeps small architectures as open_clip model JSON files in `configs/models/`
(`tiny` trains at hundreds of samples/s on two CPU cores). Any path to such a JSON file works
too. Resolving a name registers the file with open_clip, so that open_clip's own factories build
the towers, tokenizer and transforms for it exactly as they do for ViT-B-32.
"""

from pathlib import Path

import open_clip
from open_clip.transform import PreprocessCfg, image_transform_v2

from multimodal.data.pixels import EvalTransform, TrainCrop
from multimodal.errors import UserError

# configs/ as package data in an installed wheel; the repository's own in a checkout or editable install
CONFIG_DIR = next(p for p in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent /
                              "configs") if (p / "models").is_dir())
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


def train_crop(name: str) -> TrainCrop:
    """open_clip's training crop for `name` (RandomResizedCrop, scale 0.9-1, its interpolation), as
    boxes and uint8 resampling (`multimodal.data.pixels`): same boxes for the same random state as
    `transforms(name)[0]`, resampled by torch's antialiased uint8 kernels (several times faster than
    PIL's, within a level or two in 255), normalised later on the device."""
    cfg = PreprocessCfg(size=image_size(name))
    return TrainCrop(image_size(name), mode=cfg.interpolation)


def eval_transform(name: str) -> EvalTransform:
    """open_clip's eval transform for `name` (shorter side resized, centre crop, normalised), split into
    uint8 pixels for the loader and normalisation on the device (`multimodal.data.pixels`). Within a
    level or two in 255 of `transforms(name)[1]` on the same image; from DCT-scaled JPEGs, a few more."""
    cfg = PreprocessCfg(size=image_size(name))
    return EvalTransform(image_size(name), tuple(cfg.mean), tuple(cfg.std), mode=cfg.interpolation)


def tokenizer(name: str):
    """open_clip's tokenizer for `name`: list of strings -> (N, context_length) int64."""
    return open_clip.get_tokenizer(resolve(name))
