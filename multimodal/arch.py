"""Architectures by name: open_clip's built-in ones and the project's own JSON configs.

The project keeps small architectures as open_clip model JSON files in `configs/models/`
(`tiny` trains at hundreds of samples/s on two CPU cores). Any path to such a JSON file works
too. `load(name)` resolves a name once into an `Architecture`: it registers the file with
open_clip, so that open_clip's own factories build the towers, tokenizer and transforms for it
exactly as they do for ViT-B-32, and the entry points hand the object down to everything else.
"""

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from multimodal.data.pixels import EvalTransform, TrainCrop
from multimodal.errors import UserError

# configs/ as package data in an installed wheel; the repository's own in a checkout or editable install
CONFIG_DIR = next(p for p in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent /
                              "configs") if (p / "models").is_dir())
MODEL_CONFIG_DIR = CONFIG_DIR / "models"


def project_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


@dataclass(frozen=True, eq=False)  # one object per name (`load` is cached): identity is equality
class Architecture:
    """One architecture, resolved: what the model, the data pipeline and the evaluations need of it."""

    name: str  # as the user gave it: `tiny`, `ViT-B-32`, `path/to/my-arch.json`
    open_clip_name: str  # the name open_clip knows it by (a JSON file's stem)
    own: bool  # the project's own or a user's JSON file, not built into open_clip
    image_size: int
    embed_dim: int
    context_length: int
    tokenizer: Callable[[list[str]], torch.Tensor]  # open_clip's: list of strings -> (N, context_length) int64
    # open_clip's training crop (RandomResizedCrop, scale 0.9-1, its interpolation) as boxes and uint8
    # resampling (`multimodal.data.pixels`): the same boxes for the same random state as
    # `open_clip_transforms()[0]`, resampled by torch's antialiased uint8 kernels (several times faster
    # than PIL's, within a level or two in 255), normalised later on the device.
    train_crop: TrainCrop
    # open_clip's eval transform (shorter side resized, centre crop, normalised with its pixel statistics),
    # split into uint8 pixels for the loader and normalisation on the device. Within a level or two in 255
    # of `open_clip_transforms()[1]` on the same image; from DCT-scaled JPEGs, a few more.
    eval_transform: EvalTransform
    _config: dict = field(repr=False)

    @property
    def config(self) -> dict:
        """A copy of the open_clip model config (embed_dim, vision_cfg, text_cfg), the caller's to change."""
        return copy.deepcopy(self._config)

    def open_clip_transforms(self):
        """open_clip's own (train, val) PIL transforms: PIL image -> normalised (3, H, W); the reference
        that `train_crop` and `eval_transform` are compared with."""
        cfg = PreprocessCfg(size=self.image_size)
        return image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False)

    def create_towers(self, **kwargs) -> open_clip.CLIP:
        """Randomly initialised open_clip towers; `kwargs` go to `open_clip.create_model`."""
        return open_clip.create_model(self.open_clip_name, pretrained=None, **kwargs)


@functools.cache
def load(name: str) -> Architecture:
    """The architecture `name`: an open_clip one, one of the project's (`project_models()`), or a path to
    an open_clip model JSON file, which is registered with open_clip here, once."""
    open_clip_name, own = _register(name)
    config = open_clip.get_model_config(open_clip_name)
    size = config["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    # open_clip's preprocessing of a model created without pretrained weights: its default statistics
    preprocess = PreprocessCfg(size=size)
    tokenizer = open_clip.get_tokenizer(open_clip_name)
    return Architecture(
        name=name, open_clip_name=open_clip_name, own=own, image_size=size, embed_dim=config["embed_dim"],
        context_length=tokenizer.context_length, tokenizer=tokenizer,
        train_crop=TrainCrop(size, mode=preprocess.interpolation),
        eval_transform=EvalTransform(size, tuple(preprocess.mean), tuple(preprocess.std),
                                     mode=preprocess.interpolation),
        _config=config,
    )


def _register(name: str) -> tuple[str, bool]:
    """(open_clip name, whether it is a JSON file of ours or the user's), registering that file."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"Model config file {name} does not exist: pass an existing open_clip model JSON.")
        open_clip.add_model_config(path)
        return path.stem, True
    project_file = MODEL_CONFIG_DIR / f"{name}.json"
    if project_file.is_file():
        open_clip.add_model_config(project_file)
        return name, True
    if name in open_clip.list_models():
        return name, False
    raise UserError(
        f"Unknown model '{name}': use an open_clip architecture such as ViT-B-32, ViT-B-16 or RN50, "
        f"one of the project's own ({', '.join(project_models())}), or a path to a model JSON file."
    )
