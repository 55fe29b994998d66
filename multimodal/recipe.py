"""The `model:` section of the configs: what a run trains, built once.

`build_module` is what `multimodal train` instantiates for that section (LightningCLI takes its
signature as the schema, so `--print_config` shows every default and `--model.lr` sets one). It
checks the settings, then builds everything `CLIPModule` receives: the two-tower model of the
architecture (the loss's initial temperature and bias, patch dropout, locked towers), pretrained
weights, gradient checkpointing and `torch.compile` applied from outside the model, the loss chosen
once, and the callbacks that watch the run. The settings are the run's hyperparameters, saved in
its checkpoints (`multimodal export` reads `model_name` there).
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

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

# The settings that can be checked alone: (name, test, the rule as the error states it), checked in this order.
SETTING_RULES = (
    ("lr", lambda v: v > 0, "must be positive"),
    ("betas", lambda v: all(0.0 <= b < 1.0 for b in v), "must both be in [0, 1)"),
    ("eps", lambda v: v > 0, "must be positive"),
    ("weight_decay", lambda v: v >= 0, "must be 0 or more"),
    ("warmup_steps", lambda v: v >= 0, "must be 0 or more"),
    ("min_lr_ratio", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    ("micro_batches", lambda v: v >= 1, "must be 1 or more"),
    ("max_nonfinite_steps", lambda v: v >= 1, "must be 1 or more"),
    ("patch_dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
)
COCA_ARCHITECTURES = "coca_ViT-B-32, coca_ViT-L-14, tiny-coca"


def check_settings(settings: dict) -> None:
    """One sentence for the first of `SETTING_RULES` that `settings` (build_module's arguments) break."""
    for name, ok, must in SETTING_RULES:
        value = settings[name]
        if not ok(value):
            shown = list(value) if isinstance(value, tuple) else value  # as YAML writes a pair
            raise UserError(f"model.{name} {must}, got {shown}.")


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
