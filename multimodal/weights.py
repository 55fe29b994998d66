"""Loading trained weights from local files, and exporting them as open_clip state dicts.

Two kinds of checkpoint load here, neither of which can run code:
- this project's Lightning checkpoints (`.ckpt`), read with `torch.load(weights_only=True)`;
  their hyper-parameters name the architecture;
- open_clip state dicts (`.pt`, `.bin`, `.pth` through `torch.load(weights_only=True)`,
  `.safetensors` through safetensors), which need the architecture name alongside.
Export writes the towers' state dict as open_clip names it, so that
`open_clip.create_model_and_transforms(NAME, pretrained=PATH)` loads it as it is; for the
project's own architectures the model JSON is written beside it.
"""

import pickle
import shutil
from pathlib import Path

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from multimodal import arch
from multimodal.errors import UserError
from multimodal.model import CLIP, create_model

LIGHTNING_PREFIX = "model.towers."
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} holds objects other than tensors and plain values, which are never loaded "
                        f"(weights_only=True): {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0]}).") from None


def _load_into(model: CLIP, state_dict: dict, path: Path, name: str) -> None:
    try:
        model.towers.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"Checkpoint {path} does not match architecture {name} ({detail[:200]}): "
                        "pass the --model it was trained with.") from None


def load_model(checkpoint: str | Path, model_name: str | None = None) -> tuple[CLIP, str]:
    """(model, architecture name) from a local checkpoint file; `model_name` overrides the .ckpt's."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist: pass a local .ckpt, .pt, .bin or .safetensors file.")
    if path.suffix == ".ckpt":
        ckpt = _torch_load(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise UserError(f"{path} is not a Lightning checkpoint of this project (no state_dict).")
        name = model_name or ckpt.get("hyper_parameters", {}).get("model_name")
        if name is None:
            raise UserError(f"{path} does not name its architecture: pass --model.")
        state_dict = {k[len(LIGHTNING_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                      if k.startswith(LIGHTNING_PREFIX)}
        model = create_model(name)
        _load_into(model, state_dict, path, name)
        return model, name
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise UserError(f"{path} has an unknown checkpoint type: use a Lightning .ckpt or an open_clip "
                        f"state dict ({', '.join(STATE_DICT_SUFFIXES)}).")
    if model_name is None:
        raise UserError(f"{path} is an open_clip state dict, which does not name its architecture: pass --model.")
    model = create_model(model_name)
    try:
        open_clip.load_checkpoint(model.towers, str(path), strict=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} holds objects other than tensors and plain values, which are never loaded "
                        f"(weights_only=True): {str(exc).splitlines()[0]}") from None
    except (RuntimeError, KeyError, ValueError, AssertionError, SafetensorError, EOFError) as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"Checkpoint {path} does not match architecture {model_name} ({detail[:200]}): "
                        "pass the --model it was trained with.") from None
    return model, model_name


def export(model: CLIP, model_name: str, out: Path) -> list[Path]:
    """Write the open_clip state dict to `out` (.safetensors or .pt); returns the files written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.towers.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        save_file(state_dict, str(tmp))
    elif out.suffix in (".pt", ".pth", ".bin"):
        torch.save(state_dict, tmp)
    else:
        raise UserError(f"--out {out} must end in .safetensors, .pt, .pth or .bin.")
    tmp.replace(out)
    written = [out]
    if model_name.endswith(".json") or model_name in arch.project_models():
        source = Path(model_name) if model_name.endswith(".json") else arch.MODEL_CONFIG_DIR / f"{model_name}.json"
        config_path = out.parent / f"{source.stem}.json"
        if source.resolve() != config_path.resolve():
            shutil.copyfile(source, config_path)
        written.append(config_path)
    return written
