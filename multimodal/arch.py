"""Architectures by name: open_clip's built-in ones and the project's own JSON configs.

The project keeps small architectures as open_clip model JSON files in `configs/models/`
(`tiny` trains at hundreds of samples/s on two CPU cores). Any path to such a JSON file works
too. `load(name)` resolves a name once into an `Architecture`: it registers the file with
open_clip, so that open_clip's own factories build the towers, tokenizer and transforms for it
exactly as they do for ViT-B-32, and the entry points hand the object down to everything else.

A config is checked before anything is built from it (`check_config`): every setting has the type
open_clip's config classes declare, sizes are positive, and the model it describes fits in memory
(`parameter_count` x 4 bytes against `memory_limit`: the machine's memory, the process's ulimit or
its cgroup's, or MULTIMODAL_MEMORY_LIMIT); each failure is one sentence naming the setting.
"""

import copy
import dataclasses
import difflib
import functools
import json
import math
import os
import re
import resource
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.coca_model import MultimodalCfg
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from multimodal import pretrained as published
from multimodal.errors import UserError, first_line
from multimodal.preprocessing import Preprocessing
from multimodal.userfiles import read_json

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
        `kwargs` go to `open_clip.create_model`. What open_clip cannot build of a user's config that
        `check_config` let through (heads that do not divide a width) is one sentence."""
        try:
            return open_clip.create_model(self.open_clip_name, pretrained=None, load_weights=False,
                                          pretrained_text=False, **self._create, **kwargs)
        except (AssertionError, TypeError, ValueError, ZeroDivisionError) as exc:
            if not self.own:
                raise
            raise UserError(f"open_clip cannot build {self.name} from its config ({first_line(exc, 120)}): fix "
                            "the config, or pick another architecture.") from None


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
        check_config(config, f"{name}'s {published.CONFIG_FILE}", "model_cfg.")
        if hub.get("preprocess_cfg") is not None:
            _check_preprocess(hub["preprocess_cfg"], f"{name}'s {published.CONFIG_FILE}")
    else:
        open_clip_name, own = _register(name)
        config = open_clip.get_model_config(open_clip_name)
    size = config["vision_cfg"].get("image_size", 224)
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
        check_config(read_json(path, "pass an open_clip model JSON"), f"Model config file {name}")
        open_clip.add_model_config(path)
        return path.stem, True
    project_file = MODEL_CONFIG_DIR / f"{name}.json"
    if project_file.is_file():
        open_clip.add_model_config(project_file)
        check_config(open_clip.get_model_config(name), name)
        return name, True
    if name in open_clip.list_models():
        check_config(open_clip.get_model_config(name), name)
        return name, False
    raise UserError(
        f"Unknown model '{name}': use an open_clip architecture such as ViT-B-32, ViT-B-16 or RN50, "
        f"one of the project's own ({', '.join(project_models())}), or a path to a model JSON file."
    )


# Memory: what a model or a decoding may take at most, checked before either starts.

MEMORY_VARIABLE = "MULTIMODAL_MEMORY_LIMIT"  # bytes, or a number with K, M, G or T (binary): 64G
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def memory_limit(device: torch.device | None = None) -> tuple[int, str]:
    """(bytes, what they are, to end "more than the N GiB ..."): MULTIMODAL_MEMORY_LIMIT where set; else the
    memory of `device` when it is a GPU; else the least of this machine's memory, this process's ulimit
    (RLIMIT_DATA, RLIMIT_AS) and its cgroup's memory.max."""
    text = os.environ.get(MEMORY_VARIABLE, "").strip()
    if text:
        found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
        if not found:
            raise UserError(f"{MEMORY_VARIABLE}={text} is not an amount of memory: give bytes or a number with K, "
                            "M, G or T, such as 64G.")
        return int(float(found[1]) * _UNITS[found[2].upper()]), f"that {MEMORY_VARIABLE} allows"
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "of the GPU"
    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of this machine's memory")]
    for which in (resource.RLIMIT_DATA, resource.RLIMIT_AS):
        soft = resource.getrlimit(which)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, "that this process's ulimit allows"))
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.is_file() and (value := cgroup.read_text().strip()).isdigit():
        limits.append((int(value), "that this container's cgroup allows"))
    return min(limits)


def gib(n: float) -> str:
    """An amount of memory for a sentence: "3.2 GiB", "512.0 MiB"."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


# Configs: the types open_clip's config classes declare, sizes positive, the model within memory.

_TOP_LEVEL = {"embed_dim": int, "vision_cfg": dict, "text_cfg": dict, "multimodal_cfg": dict, "custom_text": bool,
              "quick_gelu": bool, "init_logit_scale": float, "init_logit_bias": float | None,
              "nonscalar_logit_scale": bool}
_TOWERS = {"vision_cfg": CLIPVisionCfg, "text_cfg": CLIPTextCfg, "multimodal_cfg": MultimodalCfg}
_SIZES = {"embed_dim", "layers", "width", "head_width", "patch_size", "image_size", "heads", "context_length",
          "vocab_size", "attn_pooler_queries", "attn_pooler_heads", "dim_head", "n_queries", "mlp_ratio", "size"}
_MAX_SIZE = 2**40  # no larger size fits anywhere, and products of such stay within a float


@functools.cache
def _fields(cls: type) -> dict[str, object]:
    """A config class's settings and their types (a number for mlp_ratio, which open_clip multiplies, whatever
    the annotation says)."""
    hints = typing.get_type_hints(cls)
    return {f.name: float if f.name == "mlp_ratio" else hints[f.name] for f in dataclasses.fields(cls)}


def _matches(value, kind) -> bool:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        return isinstance(value, list | tuple) and (len(value) == len(items) or items[-1] is Ellipsis) \
            and all(_matches(v, items[0]) for v in value)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if kind is type(None) else isinstance(value, typing.get_origin(kind) or kind)


_KINDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string", dict: "an object",
          type(None): "null"}


def _described(kind) -> str:
    """A type as a sentence names it: "a whole number or a list of 2 whole numbers"."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_described(k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        count = "" if items[-1] is Ellipsis else f"{len(items)} "
        return f"a list of {count}{_described(items[0]).removeprefix('a ')}s"
    return _KINDS.get(typing.get_origin(kind) or kind, str(kind))


def _check_fields(values: dict, kinds: dict, what: str, prefix: str, nulls: bool = True) -> None:
    """Settings known, of their types, sizes positive and below _MAX_SIZE; with `nulls`, null is unset (as
    open_clip's own tower configs write it)."""
    for key, value in values.items():
        if key not in kinds:
            near = difflib.get_close_matches(key, kinds, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise UserError(f"{what}: {prefix}{key} is not a setting open_clip {open_clip.__version__} knows{hint}: "
                            "fix the config.")
        shown = json.dumps(value)
        if value is None and nulls:
            continue
        if not _matches(value, kinds[key]):
            raise UserError(f"{what}: {prefix}{key} is {shown[:40]} where {_described(kinds[key])} belongs: fix "
                            "the config.")
        numbers = value if isinstance(value, list) else [value]
        if key in _SIZES and not all(0 < n <= _MAX_SIZE for n in numbers):
            raise UserError(f"{what}: {prefix}{key} is {shown[:40]}, which is no size: give a positive number "
                            "(at most 2**40).")


def check_config(config, what: str, prefix: str = "") -> None:
    """One sentence naming `what` ("hf-hub:org/repo's open_clip_config.json") and the setting (after `prefix`)
    unless open_clip model config `config` has the settings and types open_clip declares, positive sizes and
    a model that fits in `memory_limit()` as float32."""
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
        raise UserError(f"{what} is not an open_clip model config (embed_dim, vision_cfg and text_cfg): pass one "
                        "such as configs/models/tiny.json.")
    _check_fields(config, _TOP_LEVEL, what, prefix, nulls=False)
    for key, cls in _TOWERS.items():
        if key in config:
            _check_fields(config[key], _fields(cls), what, f"{prefix}{key}.")
    params = parameter_count(config)
    limit, where = memory_limit()
    if 4 * params > limit:
        raise UserError(f"{what} describes a model of about {params / 1e6:,.0f} million parameters ({gib(4 * params)} "
                        f"in float32), more than the {gib(limit)} {where}: pick a smaller model, or set "
                        f"{MEMORY_VARIABLE} (such as 64G) where there is more memory.")


def _check_preprocess(cfg, what: str) -> None:
    """A repository's preprocess_cfg: the types of open_clip's PreprocessCfg, three channels, positive std."""
    if not isinstance(cfg, dict):
        raise UserError(f"{what}: preprocess_cfg is {json.dumps(cfg)[:40]} where an object belongs: fix the config.")
    known = _fields(PreprocessCfg)
    _check_fields({k: v for k, v in cfg.items() if k in known and v is not None}, known, what, "preprocess_cfg.")
    for key in ("mean", "std"):
        if cfg.get(key) is not None and (len(cfg[key]) != 3 or (key == "std" and min(cfg[key]) <= 0)):
            raise UserError(f"{what}: preprocess_cfg.{key} is {json.dumps(cfg[key])[:40]}: give three numbers, one "
                            f"a channel{', each positive' if key == 'std' else ''}.")
    if cfg.get("mode", "RGB") != "RGB":
        raise UserError(f"{what}: preprocess_cfg.mode is {cfg['mode']!r}: open_clip reads RGB images only.")


def parameter_count(config: dict) -> int:
    """About the parameters and buffers of the model that a checked open_clip config describes, from its
    towers' widths, layers, MLP ratios, vocabularies, context lengths and patch and image sizes: within 2%
    of the count of every open_clip architecture with towers of its own. A timm trunk or a Hugging Face text
    tower counts 0 (its size is that library's)."""
    embed = config["embed_dim"]
    vision, text = config["vision_cfg"], config["text_cfg"]
    count = 0
    if "timm_model_name" not in vision:
        count += _vision_count(vision, embed)
    if "hf_model_name" not in text:
        count += _text_count(text, embed)
    if "multimodal_cfg" in config:  # CoCa's decoder: a self- and a cross-attention block a layer
        decoder = config["multimodal_cfg"]
        width, context = _get(decoder, "width", 512), _get(decoder, "context_length", 77)
        count += 2 * _blocks(width, _get(decoder, "layers", 12), _get(decoder, "mlp_ratio", 4))
        count += width * _get(decoder, "vocab_size", 49408) + context * context
    return int(count)


def _get(cfg: dict, key: str, default):
    """A setting, its default where absent or null."""
    value = cfg.get(key)
    return default if value is None else value


def _blocks(width: int, layers: int, mlp_ratio: float) -> float:
    """Transformer blocks: attention's 4 w^2 and the MLP's 2 ratio w^2 weights a block (biases, norms: O(w))."""
    return layers * (4 + 2 * mlp_ratio) * width * width


def _vision_count(cfg: dict, embed: int) -> float:
    layers, width = _get(cfg, "layers", 12), _get(cfg, "width", 768)
    if isinstance(layers, list):  # ModifiedResNet: bottlenecks of width * 2^i planes (~17 p^2), attention pool
        return sum(n * 17 * (width * 2**i) ** 2 for i, n in enumerate(layers)) + 4 * (32 * width) ** 2 \
            + 32 * width * embed
    size, patch = _get(cfg, "image_size", 224), _get(cfg, "patch_size", 16)
    height, across = (size, size) if isinstance(size, int) else size
    tokens = (height // patch) * (across // patch) + 1
    queries = _get(cfg, "attn_pooler_queries", 256) if cfg.get("attentional_pool") else 0
    return 3 * patch * patch * width + tokens * width + _blocks(width, layers, _get(cfg, "mlp_ratio", 4.0)) \
        + width * embed + queries * width


def _text_count(cfg: dict, embed: int) -> float:
    width, context = _get(cfg, "width", 512), _get(cfg, "context_length", 77)
    return (_get(cfg, "vocab_size", 49408) + context) * width + _blocks(width, _get(cfg, "layers", 12),
                                                                       _get(cfg, "mlp_ratio", 4.0)) \
        + width * embed + context * context  # the causal mask, a buffer
