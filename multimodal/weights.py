"""Loading trained weights from local files or published ones by name, and exporting open_clip state dicts.

Every checkpoint file is read here, and none can run code (`read_checkpoint`, also the check
before a run resumes):
- this project's Lightning checkpoints (`.ckpt`), read with `torch.load(weights_only=True)`;
  their hyper-parameters name the architecture;
- open_clip state dicts (`.pt`, `.bin`, `.pth` through `torch.load(weights_only=True)`,
  `.safetensors` through safetensors), which need the architecture name alongside.
Export writes the towers' state dict as open_clip names it, so that
`open_clip.create_model_and_transforms(NAME, pretrained=PATH)` loads it as it is; for the
project's own architectures the model JSON is written beside it. Neither replaces a file already
there unless asked to (a JSON beside that holds the same config is kept as it is).
"""

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from multimodal import arch
from multimodal import pretrained as published
from multimodal.errors import UserError, first_line
from multimodal.files import atomic_file, write_json
from multimodal.model import CLIP, create_model
from multimodal.paths import EXPORT_SUFFIXES, check_checkpoint

LIGHTNING_PREFIX = "model.towers."


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """The checkpoint at `path` as `torch.load(weights_only=True, mmap=True)` reads it, or a UserError: a
    checkpoint holding anything but tensors and plain values (code to run, custom classes) is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist: pass an existing .ckpt file or run folder.")
    if path.stat().st_size == 0:
        raise UserError(f"The {what} {path} is empty (0 bytes), as a write that never finished leaves it: pass "
                        "another checkpoint.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        raise UserError(f"The {what} {path} cannot be loaded safely as a checkpoint (tensors and plain values "
                        f"only): {first_line(exc, 200)}; pass a checkpoint written by `multimodal train`.") from None


def _mismatch(path: Path, name: str, exc: Exception, setting: str) -> UserError:
    lines = str(exc).splitlines()
    detail = lines[1].strip() if len(lines) > 1 else str(exc)
    return UserError(f"Checkpoint {path} does not match architecture {name} ({detail[:200]}): "
                     f"pass the {setting.format('model')} it was trained with.")


def _lightning_towers(path: Path) -> tuple[dict, dict]:
    """(towers' state dict, hyper-parameters) of one of this project's Lightning checkpoints."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a Lightning checkpoint of this project (no state_dict).")
    towers = {k[len(LIGHTNING_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(LIGHTNING_PREFIX)}
    return towers, ckpt.get("hyper_parameters", {})


def _has_logit_bias(path: Path) -> bool:
    """Whether an open_clip state dict file holds SigLIP's `logit_bias`, without reading its tensors."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return "logit_bias" in f.keys()
        state_dict = read_checkpoint(path)
    except (UserError, SafetensorError, OSError):  # unreadable: load_weights says why
        return False
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    return isinstance(state_dict, dict) and any(k.removeprefix("module.") == "logit_bias" for k in state_dict)


def _load_towers(model: CLIP, state_dict: dict, path: Path, name: str, setting: str) -> None:
    try:
        model.towers.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise _mismatch(path, name, exc, setting) from None


def load_weights(model: CLIP, checkpoint: str | Path, setting: str = "{}") -> None:
    """Load a local checkpoint file's towers into `model`.

    Lightning .ckpt files load strictly; open_clip state dicts through open_clip's own loader
    (strict, `weights_only`), which also lets a SigLIP model start from CLIP weights. `setting` names the
    architecture's setting, `model`, in the caller's words ("--{}" on a command line).
    """
    path = Path(checkpoint)
    check_checkpoint(path)
    if path.suffix == ".ckpt":
        _load_towers(model, _lightning_towers(path)[0], path, model.architecture.name, setting)
        return
    try:
        open_clip.load_checkpoint(model.towers, str(path), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} holds objects other than tensors and plain values, which are never loaded "
                        f"(weights_only=True): {first_line(exc)}") from None
    except (RuntimeError, KeyError, ValueError, AssertionError, SafetensorError, EOFError) as exc:
        raise _mismatch(path, model.architecture.name, exc, setting) from None


def load_model(checkpoint: str | Path | None = None, model_name: str | None = None, *,
               pretrained: str | None = None, cache_dir: str | Path | None = None, setting: str = "{}") -> CLIP:
    """A model with weights (`model.architecture` says which): from a local checkpoint file, or published ones
    by name (`multimodal.pretrained`: `model_name` with a `pretrained` tag or file, or an `hf-hub:` repository).

    A .ckpt names its architecture (and the tag it started from, whose preprocessing it keeps); `model_name`
    overrides it. An open_clip state dict needs `model_name`. `setting` names the options `checkpoint`,
    `model` and `pretrained` in the caller's words ("--{}" on a command line).
    """
    checkpoint_option, model_option, pretrained_option = (setting.format(name) for name in
                                                          ("checkpoint", "model", "pretrained"))
    if checkpoint is None:
        if model_name is None:
            raise UserError(f"Pass {checkpoint_option}, or {model_option} with {pretrained_option} (a tag or a "
                            f"file), or {model_option} hf-hub:ORG/REPO.")
        architecture = arch.load(model_name, pretrained, cache_dir)  # an unknown name or tag says so first
        path = published.weights_file(model_name, pretrained, cache_dir)
        if path is None:
            raise UserError(f"{model_name} alone has no weights: add {pretrained_option} (a tag, `multimodal models "
                            f"{model_name}` lists them, or a file), or pass {checkpoint_option}.")
        if path.suffix != ".ckpt":
            return _state_dict_model(path, architecture, setting)
        checkpoint, pretrained = path, None
    path = Path(checkpoint)
    check_checkpoint(path)
    if path.suffix != ".ckpt":
        if model_name is None:
            raise UserError(f"{path} is an open_clip state dict, which does not name its architecture: pass "
                            f"{model_option}.")
        return _state_dict_model(path, arch.load(model_name, None, cache_dir), setting)
    state_dict, hparams = _lightning_towers(path)
    if model_name is None:
        model_name, pretrained = hparams.get("model_name"), hparams.get("pretrained")
    if model_name is None:
        raise UserError(f"{path} does not name its architecture: pass {model_option}.")
    architecture = arch.load(model_name, pretrained, cache_dir)
    model = create_model(architecture, init_logit_bias=0.0 if "logit_bias" in state_dict else None)
    _load_towers(model, state_dict, path, model_name, setting)  # the checkpoint is read once
    return model


def _state_dict_model(path: Path, architecture: arch.Architecture, setting: str) -> CLIP:
    """A model of `architecture` with the open_clip state dict at `path`."""
    model = create_model(architecture, init_logit_bias=0.0 if _has_logit_bias(path) else None)  # value loaded next
    load_weights(model, path, setting)
    return model


def progress(checkpoint: str | Path) -> dict:
    """`step` and `epoch` of a training checkpoint (.ckpt); nothing for other weights or unreadable files."""
    path = Path(checkpoint)
    if path.suffix != ".ckpt" or not path.is_file():
        return {}
    try:
        ckpt = read_checkpoint(path)
    except UserError:
        return {}
    return {k: ckpt[v] for k, v in (("step", "global_step"), ("epoch", "epoch")) if isinstance(ckpt.get(v), int)}


def _beside(model: CLIP, out: Path) -> tuple[Path, dict] | None:
    """(path, config) of the architecture JSON written beside exported weights at `out`, where one is: the
    project's own architectures, and any with SigLIP's bias, which open_clip's config of the same name would
    not create."""
    architecture = model.architecture
    if not (architecture.own or model.logit_bias is not None):
        return None
    stem, config = architecture.short_name, architecture.config
    if model.logit_bias is not None:
        config["init_logit_bias"] = float(model.logit_bias.detach())
        stem = stem if stem.lower().endswith("siglip") else f"{stem}-siglip"
    return out.parent / f"{stem}.json", config


def _holds(path: Path, config: dict) -> bool:
    """Whether the file at `path` is the JSON of `config` (read only when it is a small regular file)."""
    if not path.is_file() or path.stat().st_size > 1 << 20:
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(config))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def export(model: CLIP, out: Path, overwrite: bool = False, setting: str = "{}") -> list[Path]:
    """Write the open_clip state dict to `out` (.safetensors or .pt), and the architecture's JSON beside it where
    open_clip needs it; returns the files. An existing file in either place is left as it is and refused, unless
    `overwrite` (a JSON beside that already holds the same config is kept). `setting` names the options `out` and
    `overwrite` in the caller's words ("--{}" on a command line)."""
    if out.suffix not in EXPORT_SUFFIXES:
        raise UserError(f"{out} must end in {', '.join(EXPORT_SUFFIXES[:-1])} or {EXPORT_SUFFIXES[-1]}.")
    fix = f"pass {setting.format('overwrite')} to replace it, or choose another {setting.format('out')}"
    beside = _beside(model, out)
    if not overwrite and (out.exists() or out.is_symlink()):
        raise UserError(f"{out} already exists: {fix}.")
    if not overwrite and beside and (beside[0].exists() or beside[0].is_symlink()) and not _holds(*beside):
        raise UserError(f"{beside[0]} exists and is not the model config that export writes beside {out.name}: "
                        f"move it, pass {setting.format('overwrite')} to replace it, or export into another folder.")
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.towers.state_dict().items()}
    with atomic_file(out) as f:
        if out.suffix == ".safetensors":
            f.write(save_safetensors(state_dict))
        else:
            torch.save(state_dict, f)
    if beside is None:
        return [out]
    if not _holds(*beside):
        write_json(beside[0], beside[1], indent=2)
    return [out, beside[0]]
