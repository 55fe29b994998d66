"""The `model:` section of the configs: what a run trains, built once.

`build_module` is what `multimodal train` instantiates for that section (LightningCLI takes its
signature as the schema, so `--print_config` shows every default and `--model.lr` sets one). It
checks the settings, then builds everything `CLIPModule` receives: the two-tower model of the
architecture (the loss's initial temperature and bias, patch dropout, locked towers), pretrained
weights, gradient checkpointing and `torch.compile` applied from outside the model, the loss chosen
once, and the callbacks that watch the run. The settings are the run's hyperparameters, saved in
its checkpoints (`multimodal export` reads `model_name` there).

`SETTING_RULES` holds what each number of a run's config may be, section by section (`model`, `data`,
`trainer`, `seed_everything`): `check_run` checks a parsed config against it before any work,
`check_settings` one section (build_module its own arguments).
"""

import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from multimodal import arch
from multimodal import pretrained as published
from multimodal.errors import UserError
from multimodal.loss import LOSSES, ContrastiveLoss
from multimodal.model import CLIP, create_model
from multimodal.module import CLIPModule
from multimodal.monitor import SourceShares, Throughput, TrainingHealth
from multimodal.throughput import flops_per_sample
from multimodal.weights import load_weights

LossName = Literal[tuple(LOSSES)]  # the choices of `model.loss`, as LightningCLI validates and lists them


def _optional(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or ok(v)


# Lightning's precisions that train here: the weights stay fp32 (mixed precision casts inside the step), since
# the pixels reach the towers as fp32; 16-mixed becomes bf16-mixed on a CPU (Lightning's rule).
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")
# The settings that can be checked alone, by section of the config ("" the top level; `a.b`: `b` of the
# mapping `a`, unchecked when `a` is null): (name, test, the rule as the error states it), in this order.
# Every number must be finite too (`check_settings`).
SETTING_RULES: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    "": (
        ("seed_everything", lambda v: isinstance(v, bool) or 0 <= v < 2 ** 32,
         f"must be true, false or a whole number from 0 to {2 ** 32 - 1}"),
    ),
    "model": (
        ("lr", lambda v: v > 0, "must be positive"),
        ("betas", lambda v: all(0.0 <= b < 1.0 for b in v), "must both be in [0, 1)"),
        ("eps", lambda v: v > 0, "must be positive"),
        ("weight_decay", lambda v: v >= 0, "must be 0 or more"),
        ("warmup_steps", lambda v: v >= 0, "must be 0 or more"),
        ("min_lr_ratio", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
        ("val_loss_batch_size", lambda v: v >= 1, "must be 1 or more"),
        ("caption_loss_weight", lambda v: v >= 0, "must be 0 or more"),
        ("micro_batches", lambda v: v >= 1, "must be 1 or more"),
        ("lock_image_unlocked_groups", lambda v: v >= 0, "must be 0 or more"),
        ("lock_text_unlocked_layers", lambda v: v >= 0, "must be 0 or more"),
        ("max_nonfinite_steps", lambda v: v >= 1, "must be 1 or more"),
        ("patch_dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
        ("peak_tflops", _optional(lambda v: v > 0), "must be positive (or null: looked up for known GPUs)"),
    ),
    "data": (
        ("batch_size", lambda v: v >= 1, "must be 1 or more"),
        ("num_workers", lambda v: v >= 0, "must be 0 or more"),
        ("shuffle_buffer", lambda v: v >= 0, "must be 0 or more"),
        ("num_samples", _optional(lambda v: v >= 1), "must be 1 or more (or null: read from the shards)"),
        ("max_bad_fraction", lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1"),
        ("max_image_pixels", _optional(lambda v: v >= 1), "must be 1 or more (or null: no limit)"),
        ("synthetic.train_samples", lambda v: v >= 1, "must be 1 or more"),
        ("synthetic.val_samples", lambda v: v >= 0, "must be 0 or more"),
        ("synthetic.shard_size", lambda v: v >= 1, "must be 1 or more"),
        ("synthetic.image_size", lambda v: 16 <= v <= 4096, "must be from 16 to 4096"),
    ),
    "trainer": (
        ("precision", _optional(lambda v: str(v) in PRECISIONS),
         "must be 32-true, bf16-mixed or 16-mixed (or null: bf16-mixed on a GPU that has it, else 32-true)"),
        ("max_steps", lambda v: v == -1 or v >= 1, "must be -1 (no limit) or 1 or more"),
        ("max_epochs", _optional(lambda v: v == -1 or v >= 1), "must be -1 (no limit) or 1 or more"),
        ("min_steps", _optional(lambda v: v >= 0), "must be 0 or more"),
        ("min_epochs", _optional(lambda v: v >= 0), "must be 0 or more"),
        ("num_nodes", lambda v: v >= 1, "must be 1 or more"),
        ("limit_train_batches", _optional(lambda v: v > 0 and (isinstance(v, int) or v <= 1)),
         "must be a fraction of the epoch's batches (above 0, at most 1.0) or a number of them (1 or more)"),
        ("limit_val_batches", _optional(lambda v: v >= 0 and (isinstance(v, int) or v <= 1)),
         "must be a fraction of the held-out batches (0 to 1.0) or a number of them (0: no validation)"),
        ("accumulate_grad_batches", lambda v: v >= 1, "must be 1 or more"),
        ("gradient_clip_val", _optional(lambda v: v >= 0), "must be 0 or more (0 or null: no clipping)"),
        ("log_every_n_steps", _optional(lambda v: v >= 0), "must be 0 or more (0: no training metrics)"),
        ("num_sanity_val_steps", _optional(lambda v: v >= -1), "must be -1 (all), 0 or more"),
        ("val_check_interval", _optional(lambda v: v > 0), "must be positive (a fraction of an epoch, or batches)"),
        ("check_val_every_n_epoch", _optional(lambda v: v >= 1), "must be 1 or more (or null)"),
    ),
}
COCA_ARCHITECTURES = "coca_ViT-B-32, coca_ViT-L-14, tiny-coca"
_UNSET = object()


def _setting(settings: Mapping, name: str):
    """`settings[name]`, a dotted name looked up level by level; `_UNSET` under a mapping that is null."""
    value = settings
    for part in name.split("."):
        if value is None:
            return _UNSET
        value = value[part]
    return value


def check_settings(settings: Mapping, section: str = "model") -> None:
    """One sentence for the first number of `settings` (a section of the config: build_module's arguments,
    the DataModule's, the Trainer's) that is not finite, else for the first of its `SETTING_RULES` broken."""
    prefix = f"{section}." if section else ""
    for name, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{name} must be a finite number, got {value}.")
    for name, ok, must in SETTING_RULES[section]:
        value = _setting(settings, name)
        if value is not _UNSET and not ok(value):
            shown = list(value) if isinstance(value, tuple) else value  # as YAML writes a pair
            raise UserError(f"{prefix}{name} {must}, got {shown}.")


def check_run(config: Mapping) -> None:
    """A whole run's settings (the parsed config, as plain mappings) before any work: each section's rules,
    then what one section asks of another."""
    check_settings({"seed_everything": config["seed_everything"]}, "")
    for section in ("model", "data", "trainer"):
        check_settings(config[section], section)
    trainer = config["trainer"]
    if trainer["max_steps"] == -1 and trainer["max_epochs"] == -1:  # Lightning's "train for ever"
        raise UserError("trainer.max_steps and trainer.max_epochs are both -1 (no end), and the learning rate's "
                        "cosine decays over the run's steps: give one of them.")
    micro, batch = config["model"]["micro_batches"], config["data"]["batch_size"]
    if len(range(0, batch, -(-batch // micro))) != micro:  # torch.chunk's count: what accumulate.cached_step cuts
        raise UserError(f"model.micro_batches {micro} cannot cut data.batch_size {batch} into {micro} chunks: "
                        "choose a number of micro-batches that divides data.batch_size.")


def check_loss(loss: str, model_name: str, architecture: arch.Architecture, micro_batches: int) -> None:
    """What `LOSSES[loss]` declares it needs, against the architecture and the micro-batches asked for."""
    kind = LOSSES[loss]
    decoding = " or ".join(name for name, other in LOSSES.items() if other.needs_caption_decoder)
    if kind.needs_caption_decoder and not architecture.has_caption_decoder:
        raise UserError(f"model.loss {loss} trains a CoCa architecture's caption decoder: {model_name} has none "
                        f"(CoCa architectures: {COCA_ARCHITECTURES}).")
    if architecture.has_caption_decoder and not kind.needs_caption_decoder:
        raise UserError(f"model.loss {loss} trains no caption decoder: {model_name} has one, so use model.loss "
                        f"{decoding} (CoCa architectures: {COCA_ARCHITECTURES}).")
    if micro_batches > 1 and not kind.supports_micro_batches:
        raise UserError(f"model.micro_batches caches the towers' features only, and model.loss {loss} needs more of "
                        "each sample than its features: set model.micro_batches to 1.")


def fresh_model(architecture: arch.Architecture, loss: ContrastiveLoss, *, patch_dropout: float, lock_image: bool,
                lock_image_unlocked_groups: int, lock_text: bool, lock_text_unlocked_layers: int) -> CLIP:
    """A randomly initialised model as configured (no weights loaded, not compiled): the loss's initial
    temperature and bias, patch dropout and the locked towers."""
    model = create_model(architecture, init_logit_scale=loss.init_logit_scale, init_logit_bias=loss.init_logit_bias,
                         patch_dropout=patch_dropout or None)
    if lock_image:
        model.towers.lock_image_tower(unlocked_groups=lock_image_unlocked_groups)
    if lock_text:
        model.towers.lock_text_tower(unlocked_layers=lock_text_unlocked_layers)
    return model


def count_flops_per_sample(fresh: Callable[[], CLIP], loss: ContrastiveLoss) -> float:
    """The model FLOPs of one training sample, counted on a `fresh()` copy on the meta device, so that any
    strategy, compiled or sharded, counts the same."""
    return flops_per_sample(fresh(), lambda m, i, t: sum(loss.terms(m, i, t, gather=False).values()))


def prepared(model: CLIP, weights: Path | None, grad_checkpointing: bool, compile: bool) -> CLIP:
    """`model` with its starting `weights` (a file, or None for none), then gradient checkpointing and
    `torch.compile` applied from outside it."""
    if weights is not None:
        load_weights(model, weights)
    if grad_checkpointing:
        model.towers.set_grad_checkpointing(True)
    if compile:  # in place: the parameters keep their names in checkpoints and exports
        model.towers.visual.compile()
        model.towers.transformer.compile()
    return model


def build_module(
    model_name: str = "tiny",
    lr: float = 5e-4,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.0,
    val_loss_batch_size: int = 256,
    loss: LossName = "clip",
    caption_loss_weight: float = 2.0,
    micro_batches: int = 1,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    lock_image: bool = False,
    lock_image_unlocked_groups: int = 0,
    lock_text: bool = False,
    lock_text_unlocked_layers: int = 0,
    grad_checkpointing: bool = False,
    patch_dropout: float = 0.0,
    compile: bool = False,
    count_flops: bool = True,
    peak_tflops: float | None = None,
    max_nonfinite_steps: int = 5,
) -> CLIPModule:
    """
    Args:
        model_name: an open_clip architecture (ViT-B-32, RN50, ...), one of configs/models/ (tiny), a JSON path,
            or `hf-hub:ORG/REPO` (an open_clip repository on the Hugging Face hub: its weights are the start).
        lr: peak learning rate, reached after `warmup_steps`.
        weight_decay: AdamW weight decay of the weight matrices.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warmup.
        min_lr_ratio: final learning rate of the cosine decay, as a fraction of `lr`.
        val_loss_batch_size: held-out images per batch of `val/loss` (the in-batch contrastive loss
            of each image with its first caption).
        loss: the training loss, by name: a class of `multimodal.loss.LOSSES`, which says what it computes,
            the temperature and bias it starts from and what it needs (docs/training.md compares them):
            `clip` softmax InfoNCE, `siglip` pairwise sigmoid with a learnable bias, `coca` `clip` plus the
            captioning loss of a CoCa architecture's caption decoder (coca_ViT-B-32, tiny-coca), ...
        caption_loss_weight: the weight of the captioning loss of a loss that trains a caption decoder
            (`coca`; open_clip's default 2).
        micro_batches: encode each device's batch in this many gradient-cached chunks: the loss and
            gradients of the whole batch with the activation memory of one chunk.
        pretrained: the weights to start from: an open_clip pretrained tag of `model_name`
            (laion2b_s34b_b79k; `multimodal models` lists them), downloaded into the Hugging Face cache,
            or a local open_clip state dict (.pt/.bin/.safetensors) or .ckpt.
        cache_dir: where downloaded weights are kept (default: the Hugging Face cache, `$HF_HOME/hub`).
        lock_image: freeze the image tower (LiT, arXiv:2111.07991).
        lock_image_unlocked_groups: with `lock_image`, leave this many last layer groups trainable.
        lock_text: freeze the text tower.
        lock_text_unlocked_layers: with `lock_text`, leave this many last layers trainable.
        grad_checkpointing: recompute both towers' activations in the backward pass.
        patch_dropout: fraction of image patches dropped in training (FLIP, arXiv:2212.00794).
        compile: `torch.compile` both towers (state dict names unchanged).
        count_flops: count the model FLOPs per sample at the start of training, to log
            `train/tflops_per_device` and `train/mfu`.
        peak_tflops: the accelerator's peak TFLOP/s for `train/mfu` (default: looked up for known GPUs).
        max_nonfinite_steps: a step whose loss is NaN or infinite on any rank is skipped (no update)
            and counted; this many in a row stop the run.
    """
    settings = dict(locals())
    check_settings(settings)
    architecture = arch.load(model_name, pretrained, cache_dir)
    check_loss(loss, model_name, architecture, micro_batches)
    contrastive = LOSSES[loss].from_settings(caption_loss_weight=caption_loss_weight)
    fresh = functools.partial(fresh_model, architecture, contrastive, patch_dropout=patch_dropout,
                              lock_image=lock_image, lock_image_unlocked_groups=lock_image_unlocked_groups,
                              lock_text=lock_text, lock_text_unlocked_layers=lock_text_unlocked_layers)
    model = prepared(fresh(), published.weights_file(model_name, pretrained, cache_dir), grad_checkpointing, compile)
    monitors = [Throughput(functools.partial(count_flops_per_sample, fresh, contrastive) if count_flops else None,
                           peak_tflops, warmup_steps=3 if compile else 1),
                TrainingHealth(max_nonfinite_steps), SourceShares()]
    module = CLIPModule(model, contrastive, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, micro_batches=micro_batches,
                        val_loss_batch_size=val_loss_batch_size, callbacks=monitors)
    module.save_hyperparameters(settings)
    return module
