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
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from multimodal import pretrained as published
from multimodal.errors import UserError, first_line
from multimodal.preprocessing import Preprocessing

# configs/ as package data in an installed wheel; the repository's own in a checkout or editable install
CONFIG_DIR = next(p for p in (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent /
                              "configs") if (p / "models").is_dir())
MODEL_CONFIG_DIR = CONFIG_DIR / "models"


def project_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


@dataclass(frozen=True, eq=False)  # one object per name (`load` is cached): identity is equality
class Architecture:
    """One architecture, resolved: what the model, the data pipeline and the evaluations need of it."""

    name: str  # as the user gave it: `tiny`, `ViT-B-32`, `path/to/my-arch.json`, `hf-hub:org/repo`
    open_clip_name: str  # the name open_clip knows it by (a JSON file's stem; `local-dir:` a hub repo's cache)
    own: bool  # the project's own, a user's JSON file or a hub repository: not built into open_clip
    image_size: int
    embed_dim: int
    context_length: int
    tokenizer: Callable[[list[str]], torch.Tensor]  # open_clip's: list of strings -> (N, context_length) int64
    # the input size, pixel statistics, interpolation and resize mode its weights were trained with, as
    # numbers: the data layer builds its crops and transforms from them (`multimodal.data.pixels`)
    preprocessing: Preprocessing
    _config: dict = field(repr=False)
    _create: dict = field(repr=False)  # what open_clip.create_model needs for these weights (QuickGELU)

    @property
    def config(self) -> dict:
        """A copy of the open_clip model config (embed_dim, vision_cfg, text_cfg), the caller's to change."""
        return copy.deepcopy(self._config)

    @property
    def has_caption_decoder(self) -> bool:
        """A CoCa architecture: a caption decoder beside the two towers."""
        return "multimodal_cfg" in self._config

    @property
    def short_name(self) -> str:
        """A file-name-safe name: `tiny`, `ViT-B-32`, `my-arch` for a JSON path, `ViT-B-16-SigLIP` for a hub repo."""
        return self.name.rsplit("/", 1)[-1].removesuffix(".json").removeprefix(published.HF_HUB)

    def create_towers(self, **kwargs) -> open_clip.CLIP:
        """Randomly initialised open_clip towers (no weights loaded, not even a Hugging Face text tower's);
        `kwargs` go to `open_clip.create_model`."""
        return open_clip.create_model(self.open_clip_name, pretrained=None, load_weights=False,
                                      pretrained_text=False, **self._create, **kwargs)


def load(name: str, pretrained: str | None = None, cache_dir: str | Path | None = None) -> Architecture:
    """The architecture `name`: an open_clip one, one of the project's (`project_models()`), a path to an
    open_clip model JSON file (registered with open_clip here, once), or an `hf-hub:org/repo` repository
    (its open_clip_config.json, from the Hugging Face cache or downloaded).

    With a pretrained tag (`multimodal.pretrained`), or for a hub repository, the eval transform and the
    pixel statistics are those its weights were trained with (SigLIP's 0.5 mean, its squashed resize...);
    otherwise open_clip's defaults. A local weights file does not change them.
    """
    tag = pretrained if pretrained and not published.is_file(pretrained) else None
    return _load(name, tag, str(cache_dir) if cache_dir else None)


@functools.cache
def _load(name: str, tag: str | None, cache_dir: str | None) -> Architecture:
    if published.is_hub(name):
        hub, folder = published.hub_config(name, cache_dir)
        config, open_clip_name, own = hub["model_cfg"], f"local-dir:{folder}", True
    else:
        open_clip_name, own = _register(name)
        config = open_clip.get_model_config(open_clip_name)
    size = config["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    weights_cfg = published.weights_config(name, tag, cache_dir)
    preprocess = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=size), weights_cfg))
    create = {}
    if weights_cfg.get("quick_gelu") and not config.get("quick_gelu"):  # OpenAI's weights, trained with QuickGELU
        config["quick_gelu"], create["force_quick_gelu"] = True, True
    if preprocess.resize_mode not in ("shortest", "squash"):
        raise UserError(f"{name} {tag or ''} expects resize_mode '{preprocess.resize_mode}', which this project does "
                        "not implement (shortest and squash): use other weights.")
    try:
        tokenizer = open_clip.get_tokenizer(open_clip_name)
    except (OSError, ValueError) as exc:  # a Hugging Face tokenizer that is neither cached nor downloadable
        hf_name = config.get("text_cfg", {}).get("hf_tokenizer_name", "?")
        raise UserError(f"The tokenizer of {name} ({hf_name}) is not in the Hugging Face cache and could not be "
                        f"downloaded ({first_line(exc, 100)}): fetch it once where there is network (same HF_HOME), "
                        "or unset HF_HUB_OFFLINE.") from None
    return Architecture(
        name=name, open_clip_name=open_clip_name, own=own, image_size=size, embed_dim=config["embed_dim"],
        context_length=tokenizer.context_length, tokenizer=tokenizer,
        preprocessing=Preprocessing(size, tuple(preprocess.mean), tuple(preprocess.std), preprocess.interpolation,
                                    preprocess.resize_mode),
        _config=config, _create=create,
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
