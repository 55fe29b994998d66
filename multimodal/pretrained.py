"""Published weights by name: open_clip's pretrained tags, `hf-hub:` repositories, the project's own tags.

    --model ViT-B-32 --pretrained laion2b_s34b_b79k     a tag: open_clip's list, then ours (`register`)
    --model hf-hub:timm/ViT-B-16-SigLIP                  a Hugging Face repository with open_clip_config.json
    --model tiny --pretrained path/to/weights.safetensors  a local file

Downloads go through open_clip's own (`open_clip.download_pretrained`), into the Hugging Face cache
(`HF_HOME`, or `cache_dir`), preferring a repository's `.safetensors` file to its pickle; a pickle
is read only with torch's weights-only loader (`multimodal.weights`). Offline (`HF_HUB_OFFLINE=1`, or
no network), weights already in the cache load as they are, and missing ones are one sentence that
names the tag, the cache folder and what to do. open_clip is imported when a tag is looked up: the
command line checks its arguments with `is_file` and `is_hub` before any heavy import.
"""

import difflib
import os
from pathlib import Path

from multimodal.errors import UserError, first_line
from multimodal.paths import CHECKPOINT_SUFFIXES
from multimodal.userfiles import read_json

HF_HUB = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"  # a repository's model_cfg and preprocess_cfg, as open_clip pushes them

# The project's own tags: architecture -> tag -> open_clip pretrained config (`hf_hub` "org/repo/"
# or "org/repo/file", or `url`; preprocessing keys mean, std, interpolation, resize_mode).
_TAGS: dict[str, dict[str, dict]] = {}


def register(model: str, tag: str, **cfg) -> None:
    """Make `tag` a pretrained tag of architecture `model`, as open_clip's own are (its `hf_hub` or `url`)."""
    if not cfg.get("hf_hub") and not cfg.get("url"):
        raise ValueError("a pretrained tag needs hf_hub='org/repo/[file]' or url=...")
    _TAGS.setdefault(model, {})[_clean(tag)] = dict(cfg)


def _clean(tag: str) -> str:
    return tag.lower().replace("-", "_")  # as open_clip normalises its tags


def is_hub(name: str) -> bool:
    return name.startswith(HF_HUB)


def tags() -> dict[str, list[str]]:
    """architecture -> its pretrained tags: open_clip's, then the project's."""
    import open_clip

    out: dict[str, list[str]] = {}
    for model, tag in open_clip.list_pretrained():
        out.setdefault(model, []).append(tag)
    for model, own in _TAGS.items():
        out.setdefault(model, []).extend(t for t in own if t not in out.get(model, []))
    return out


def is_file(pretrained: str) -> bool:
    """Whether `pretrained` names a local file rather than a tag (a path, or a checkpoint suffix)."""
    return os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in CHECKPOINT_SUFFIXES \
        or Path(pretrained).is_file()


def tag_config(model: str, tag: str) -> dict:
    """The pretrained config of `model`'s `tag`, or a UserError naming the nearest known ones."""
    import open_clip

    cfg = _TAGS.get(model, {}).get(_clean(tag)) or open_clip.get_pretrained_cfg(model, tag)
    if cfg:
        return dict(cfg)
    known = tags()
    others = sorted(m for m, ts in known.items() if _clean(tag) in ts)
    if others:
        listed = ", ".join(others[:6]) + (f" and {len(others) - 6} more" if len(others) > 6 else "")
        own = ", ".join(known.get(model, [])[:8]) or "it has none"
        raise UserError(f"Pretrained tag '{tag}' exists for {listed}, not for {model}: use the architecture "
                        f"it was trained for, or one of {model}'s tags ({own}).")
    near = difflib.get_close_matches(_clean(tag), known.get(model, []) or sorted({t for ts in known.values()
                                                                                for t in ts}), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise UserError(f"Unknown pretrained tag '{tag}' for {model}: {hint}`multimodal models {model}` lists its tags, "
                    "or pass a local weights file.")


def cache_folder(cfg: dict, cache_dir: str | Path | None = None) -> Path:
    """Where `open_clip.download_pretrained(cfg, cache_dir=...)` keeps the file."""
    if cache_dir:
        return Path(cache_dir)
    if cfg.get("hf_hub"):
        from huggingface_hub import constants
        return Path(constants.HF_HUB_CACHE)
    return Path("~/.cache/clip").expanduser()


def _download(cfg: dict, what: str, cache_dir: str | Path | None) -> Path:
    """open_clip's download of `cfg`'s file (`what`: "The weights of ViT-B-32 'openai'"), or one sentence."""
    import open_clip

    try:
        path = open_clip.download_pretrained(cfg, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # noqa: BLE001 - the hub client, urllib and open_clip raise many kinds
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise UserError(f"{what} are not in the cache folder {cache_folder(cfg, cache_dir)} and could "
                        f"not be downloaded ({'HF_HUB_OFFLINE is set' if offline else first_line(exc, 120)}): "
                        "download them once where there is network (same HF_HOME or cache folder), "
                        f"{'or unset HF_HUB_OFFLINE' if offline else 'or check the connection'}.") from None
    if not path:
        raise UserError(f"{what} have no download source (neither hf_hub nor url).")
    return Path(path)


def weights_file(model: str, pretrained: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """The local weights file for `model` and `pretrained` (a tag or a local file), downloading a tag's
    into the cache; for an `hf-hub:` model, its repository's weights. None when there are none to load."""
    if pretrained and is_file(pretrained):
        return Path(pretrained)
    if pretrained:
        return _download(tag_config(model, pretrained), f"The weights of {model} '{pretrained}'", cache_dir)
    if is_hub(model):
        return _download({"hf_hub": model[len(HF_HUB):] + "/"}, f"The weights of {model}", cache_dir)
    return None


def hub_config(model: str, cache_dir: str | Path | None = None) -> tuple[dict, Path]:
    """(open_clip_config.json, the folder holding it) of an `hf-hub:` repository, from the cache or downloaded."""
    path = _download({"hf_hub": f"{model[len(HF_HUB):]}/{CONFIG_FILE}"}, f"The model files of {model} ({CONFIG_FILE})",
                     cache_dir)
    config = read_json(path, kind=object)
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise UserError(f"{path} has no model_cfg: {model} is not an open_clip repository.")
    return config, path.parent


def weights_config(model: str, pretrained: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """What the published weights need: the preprocessing they were trained with (mean, std, interpolation,
    resize_mode, as open_clip names them) and `quick_gelu`, from an `hf-hub:` repository or a tag's config;
    empty for local files and random initialisation (open_clip's defaults)."""
    if is_hub(model):
        return dict(hub_config(model, cache_dir)[0].get("preprocess_cfg", {}))
    if pretrained and not is_file(pretrained):
        return tag_config(model, pretrained)
    return {}
