"""The `model:` section of the configs: what a run trains, built once.

`build_module` is what `multimodal train` instantiates for that section (LightningCLI takes its
signature as the schema, so `--print_config` shows every default and `--model.lr` sets one). It
checks the settings, then builds everything `CLIPModule` receives: the two-tower model of the
architecture (the loss's initial temperature and bias, patch dropout, locked towers), pretrained
weights, gradient checkpointing and `torch.compile` applied from outside the model, the loss chosen
once, and the callbacks that watch the run. The settings are the run's hyperparameters, saved in
its checkpoints (`multimodal export` reads `model_name` there).
"""

from typing import Literal

from multimodal import arch
from multimodal import pretrained as published
from multimodal.errors import UserError
from multimodal.loss import LOSSES
from multimodal.model import CLIP, create_model
from multimodal.module import CLIPModule
from multimodal.monitor import SourceShares, Throughput, TrainingHealth
from multimodal.throughput import flops_per_sample
from multimodal.weights import load_weights


def build_module(
    model_name: str = "tiny",
    lr: float = 5e-4,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.0,
    val_loss_batch_size: int = 256,
    loss: Literal["clip", "siglip", "coca"] = "clip",
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
        loss: `clip` (softmax InfoNCE) or `siglip` (pairwise sigmoid with a learnable bias; the
            temperature starts at 10 and the bias at -10, as in SigLIP), or `coca` (CoCa: `clip` plus
            `caption_loss_weight` x the captioning loss of the caption decoder; a CoCa architecture
            such as coca_ViT-B-32 or tiny-coca).
        caption_loss_weight: with `loss: coca`, the weight of the captioning loss (open_clip's default 2).
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
    for ok, rule in ((lr > 0, f"model.lr must be positive, got {lr}"),
                     (all(0.0 <= b < 1.0 for b in betas), f"model.betas must both be in [0, 1), got {list(betas)}"),
                     (eps > 0, f"model.eps must be positive, got {eps}"),
                     (weight_decay >= 0, f"model.weight_decay must be 0 or more, got {weight_decay}"),
                     (warmup_steps >= 0, f"model.warmup_steps must be 0 or more, got {warmup_steps}"),
                     (0.0 <= min_lr_ratio <= 1.0, f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}"),
                     (micro_batches >= 1, f"model.micro_batches must be 1 or more, got {micro_batches}"),
                     (max_nonfinite_steps >= 1,
                      f"model.max_nonfinite_steps must be 1 or more, got {max_nonfinite_steps}"),
                     (0.0 <= patch_dropout < 1.0, f"model.patch_dropout must be in [0, 1), got {patch_dropout}")):
        if not ok:
            raise UserError(f"{rule}.")
    architecture = arch.load(model_name, pretrained, cache_dir)
    if (loss == "coca") != architecture.captions:
        raise UserError(f"model.loss coca trains a CoCa architecture's caption decoder: {model_name} "
                        f"{'has one, so use model.loss coca' if architecture.captions else 'has none'} "
                        "(CoCa architectures: coca_ViT-B-32, coca_ViT-L-14, tiny-coca).")
    if loss == "coca" and micro_batches > 1:
        raise UserError("model.micro_batches caches contrastive features only; the captioning loss of model.loss "
                        "coca needs each sample's decoder graph: set model.micro_batches to 1.")
    contrastive = LOSSES[loss](caption_loss_weight) if loss == "coca" else LOSSES[loss]()

    def fresh() -> CLIP:
        """A randomly initialised model as configured (no weights loaded, not compiled)."""
        model = create_model(architecture, init_logit_scale=contrastive.init_logit_scale,
                             init_logit_bias=contrastive.init_logit_bias, patch_dropout=patch_dropout or None)
        if lock_image:
            model.towers.lock_image_tower(unlocked_groups=lock_image_unlocked_groups)
        if lock_text:
            model.towers.lock_text_tower(unlocked_layers=lock_text_unlocked_layers)
        return model

    def count_flops_per_sample() -> float:
        """Counted on a fresh copy, on the meta device: any strategy, compiled or sharded, counts the same."""
        copy = fresh()
        return flops_per_sample(copy, lambda m, i, t: sum(contrastive.terms(m, i, t, gather=False).values()))

    model = fresh()
    start = published.weights_file(model_name, pretrained, cache_dir)
    if start is not None:
        load_weights(model, start)
    if grad_checkpointing:
        model.towers.set_grad_checkpointing(True)
    if compile:  # in place: the parameters keep their names in checkpoints and exports
        model.towers.visual.compile()
        model.towers.transformer.compile()
    monitors = [Throughput(count_flops_per_sample if count_flops else None, peak_tflops,
                           warmup_steps=3 if compile else 1), TrainingHealth(max_nonfinite_steps), SourceShares()]
    module = CLIPModule(model, contrastive, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, micro_batches=micro_batches,
                        val_loss_batch_size=val_loss_batch_size, callbacks=monitors)
    module.save_hyperparameters(settings)
    return module
