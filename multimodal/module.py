"""The LightningModule: contrastive training of the two-tower model.

Its constructor arguments are the `model:` section of the YAML configs. AdamW with decoupled
weight decay on weight matrices only (`multimodal.optim`), a per-step linear-warmup + cosine
schedule, and `logit_scale` clamped to [0, ln 100] after every optimizer step (CLIP, section 2.5:
"clipped to prevent scaling the logits by more than 100").

A step reads no device value on the host: a loss that is not finite on some rank becomes a flag on
the device that fused AdamW takes as its `found_inf`, so the update is skipped there. Throughput,
bad data and non-finite steps are watched by the callbacks of `multimodal.monitor`, which this
module attaches (`configure_callbacks`) and which read counts only on logging steps.

Options for large models and batches: the CLIP or SigLIP loss, gradient-cached micro-batches
(`multimodal.accumulate`), gradient checkpointing, FLIP patch dropout, locked towers (LiT),
`torch.compile` of the towers, and fine-tuning from a local open_clip state dict.
"""

import math
import random
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch

from multimodal import arch, distributed
from multimodal.accumulate import cached_step
from multimodal.checkpoint import FinalCheckpoint, resume_finished_epoch_at_the_next
from multimodal.distributed import max_over_ranks_
from multimodal.errors import UserError
from multimodal.eval.embed import collect
from multimodal.eval.retrieval import retrieval_metrics
from multimodal.loss import clip_loss, siglip_loss
from multimodal.model import CLIP, create_model, scalar_state
from multimodal.monitor import Throughput, TrainingHealth, is_logging_step
from multimodal.optim import param_groups, warmup_cosine
from multimodal.throughput import flops_per_sample
from multimodal.weights import load_weights

MAX_LOGIT_SCALE = math.log(100)


def rng_states() -> dict:
    """This process's random states as plain Python values: they travel through all_gather_object
    and load with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


class CLIPModule(pl.LightningModule):
    def __init__(
        self,
        model_name: str = "tiny",
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        val_loss_batch_size: int = 256,
        loss: Literal["clip", "siglip"] = "clip",
        micro_batches: int = 1,
        pretrained: str | None = None,
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
    ):
        """
        Args:
            model_name: an open_clip architecture (ViT-B-32, RN50, ...), one of configs/models/ (tiny), or a JSON path.
            lr: peak learning rate, reached after `warmup_steps`.
            weight_decay: AdamW weight decay of the weight matrices.
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: optimizer steps of linear warmup.
            min_lr_ratio: final learning rate of the cosine decay, as a fraction of `lr`.
            val_loss_batch_size: held-out images per batch of `val/loss` (the in-batch contrastive loss
                of each image with its first caption).
            loss: `clip` (softmax InfoNCE) or `siglip` (pairwise sigmoid with a learnable bias; the
                temperature starts at 10 and the bias at -10, as in SigLIP).
            micro_batches: encode each device's batch in this many gradient-cached chunks: the loss and
                gradients of the whole batch with the activation memory of one chunk.
            pretrained: a local open_clip state dict (.pt/.bin/.safetensors) or .ckpt to start from.
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
        super().__init__()
        self.save_hyperparameters()
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
        self.arch = arch.load(model_name)
        self.model = self._build_model()
        # as built: FSDP flattens parameters, and weight decay goes by the original shapes
        self._param_ndims = {name: p.ndim for name, p in self.model.named_parameters()}
        if pretrained:
            load_weights(self.model, pretrained, self.arch)
        if grad_checkpointing:
            self.model.towers.set_grad_checkpointing(True)
        if compile:  # in place: the parameters keep their names in checkpoints and exports
            self.model.towers.visual.compile()
            self.model.towers.transformer.compile()
        self._stream_progress: dict[int, tuple[int, int]] = {}  # worker -> (batches, samples consumed)
        self._val_scalars: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.nonfinite: torch.Tensor | None = None  # the last training step's flag: 1.0 when its loss was not finite
        self._val_outputs: list = []

    def _build_model(self) -> CLIP:
        """A fresh model with the configured loss scalars, patch dropout and locked towers."""
        hp = self.hparams
        siglip = hp.loss == "siglip"
        model = create_model(self.arch, init_logit_scale=math.log(10) if siglip else None,
                             init_logit_bias=-10.0 if siglip else None, patch_dropout=hp.patch_dropout or None)
        if hp.lock_image:
            model.towers.lock_image_tower(unlocked_groups=hp.lock_image_unlocked_groups)
        if hp.lock_text:
            model.towers.lock_text_tower(unlocked_layers=hp.lock_text_unlocked_layers)
        return model

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, self._param_ndims)
        # Fused AdamW (CPU and CUDA): one kernel per step instead of several per parameter, and it skips a
        # non-finite step on the device (`optimizer_step`). Not under fp16 AMP, whose scaler unscales
        # gradients before clipping, which Lightning allows only for an optimizer that does not.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas, eps=hp.eps, fused=scaler is None)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_model(self) -> None:
        """Before the strategy wraps the model: FSDP needs the loss scalars as 1-element vectors
        (checkpoints keep open_clip's 0-d shape: `on_save_checkpoint`)."""
        if self._fsdp:
            self.model.vectorise_scalars()

    @property
    def _fsdp(self) -> bool:
        return self._trainer is not None and "FSDP" in type(self.trainer.strategy).__name__

    def on_fit_start(self) -> None:
        if self.hparams.micro_batches > 1 and self._fsdp:
            raise UserError("model.micro_batches needs whole parameters on every rank: use the ddp strategy "
                            "(FSDP shards them), or set model.micro_batches to 1.")

    def configure_callbacks(self) -> list[pl.Callback]:
        """Throughput and MFU, bad data and non-finite steps: logged and checked by callbacks
        (`multimodal.monitor`) that read device values only on logging steps; `last.ckpt` at the final step."""
        hp = self.hparams
        return [Throughput(hp.count_flops, hp.peak_tflops, warmup_steps=3 if hp.compile else 1),
                TrainingHealth(hp.max_nonfinite_steps), FinalCheckpoint()]

    def flops_per_sample(self) -> float:
        """Model FLOPs of one training sample, counted on a fresh copy: any strategy, compiled or
        sharded, counts the same."""
        copy = self._build_model()
        return flops_per_sample(copy, self.arch, lambda i, t: self._loss(copy, i, t, gather=False))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The stream's position, for a mid-epoch resume: recorded as the batch starts, because a
        # checkpoint callback saves in on_train_batch_end before the module's own hook runs.
        if "worker" in batch:
            batches = self._stream_progress.get(batch["worker"], (0, 0))[0]
            self._stream_progress[batch["worker"]] = (batches + 1, int(batch["consumed"]))

    def on_train_epoch_start(self) -> None:
        self._stream_progress = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add every rank's stream position and random state (Lightning saves model, optimizer,
        scheduler, scaler and loop progress). Runs on every rank, as checkpointing does."""
        progress = distributed.all_gather_objects(self._stream_progress)
        checkpoint["stream_position"] = {
            "epoch": self.current_epoch, "global_step": self.global_step, "world_size": self.trainer.world_size,
            "num_workers": max(1, getattr(self.trainer.datamodule, "num_workers", 0) or 0),
            "ranks": [{int(w): list(p) for w, p in rank.items()} for rank in progress],
        }
        checkpoint["rng_states"] = distributed.all_gather_objects(rng_states())
        scalar_state(checkpoint.get("state_dict", {}))  # (1,) under FSDP: saved as open_clip's ()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume_finished_epoch_at_the_next(checkpoint)  # before Lightning restores its loops from it
        states = checkpoint.get("rng_states")
        if states and len(states) == self.trainer.world_size:
            set_rng_states(states[self.trainer.global_rank])
        position = checkpoint.get("stream_position")
        datamodule = self.trainer.datamodule if self.trainer else None
        if position and hasattr(datamodule, "resume_from"):
            datamodule.resume_from(position)

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                         gather: bool = True) -> torch.Tensor:
        """The configured loss of unit features, with the model's temperature (and bias)."""
        return self._loss(self.model, image_features, text_features, gather)

    def _loss(self, model: CLIP, image_features: torch.Tensor, text_features: torch.Tensor,
              gather: bool) -> torch.Tensor:
        return self._loss_of(image_features, text_features, model.logit_scale.exp(), model.logit_bias, gather)

    def _loss_of(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, gather: bool) -> torch.Tensor:
        if self.hparams.loss == "siglip":
            return siglip_loss(image_features, text_features, scale, bias, gather=gather)
        return clip_loss(image_features, text_features, scale, gather=gather)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.micro_batches > 1:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 AMP's loss scale
            loss, surrogate = cached_step(self.model, batch["image"], batch["text"], self.contrastive_loss,
                                          self.hparams.micro_batches, scaler.get_scale() if scaler else 1.0)
        else:
            loss = surrogate = self.contrastive_loss(self.model.encode_image(batch["image"]),
                                                     self.model.encode_text(batch["text"]))
        # 1.0 when the loss of any rank is NaN or infinite: every rank then skips the update, on the
        # device (`optimizer_step`); `TrainingHealth` counts such steps. Nothing is read on the host.
        self.nonfinite = max_over_ranks_(torch.isfinite(loss.detach()).logical_not().float())
        self.log("train/loss", loss.detach())  # not prog_bar: Lightning would read it every step
        self.log("train/logit_scale", self.model.logit_scale.detach().exp())
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias.detach())
        if is_logging_step(self.trainer, before_step=True):  # a Python number becomes a device tensor: a copy
            self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return surrogate

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The training step and backward (the closure), then the update. A step whose loss was not
        finite on some rank changes no weight and no optimizer state: fused AdamW takes the flag as
        its `found_inf` and skips on the device, as under a gradient scaler (Lightning still counts
        the step, and the learning-rate schedule moves on). Under fp16 AMP the scaler does the same
        from the gradients, which a non-finite loss makes non-finite."""
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()
        adamw, fused = optimizer.optimizer, optimizer.optimizer.defaults["fused"]
        if fused:
            adamw.found_inf = self.nonfinite
        try:
            optimizer.step(closure=lambda: loss)
        finally:
            if fused:
                del adamw.found_inf
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """`trainer.gradient_clip_val` under FSDP and with fused AdamW too. FSDP: the norm of the whole
        gradient is computed over every rank's shard by FSDP itself (Lightning's FSDP precision refuses
        'norm'). Fused AdamW: Lightning's AMP plugin refuses to clip for any optimizer that could unscale
        gradients itself, even under bf16, where there is no scaler; the gradients here are unscaled."""
        if not gradient_clip_val:
            return
        by_norm = gradient_clip_algorithm in (None, "norm")
        if self._fsdp and by_norm:
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif optimizer.defaults["fused"]:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            clip = torch.nn.utils.clip_grad_norm_ if by_norm else torch.nn.utils.clip_grad_value_
            clip(params, gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Embeds every image and caption of the held-out shards (`EmbedBatches` batches)."""
        images = self.model.encode_image(batch["images"]).float().cpu() if batch["images"] is not None else None
        texts = self.model.encode_text(batch["texts"]).float().cpu() if batch["texts"] is not None else None
        # The loss's scalars as this step sees them: inside the strategy's forward, where an FSDP
        # model holds whole parameters (outside it, a rank may hold none of logit_scale).
        bias = self.model.logit_bias
        self._val_scalars = (self.model.logit_scale.detach().exp().float().cpu(),
                             bias.detach().float().cpu() if bias is not None else None)
        if batch["part"] < 0:  # padding (ShardDataModule.val_dataloader): towers run, results dropped
            return
        rows = {k: batch[k] for k in ("part", "image_rows", "text_rows")}  # keep no pixels or tokens
        self._val_outputs.append((rows, images, texts))

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if self.trainer.sanity_checking:
            return
        # Each rank embedded every W-th part; every rank scores the whole set, in part order, so
        # the figures do not depend on the number of ranks.
        emb = collect([o for rank in distributed.all_gather_objects(outputs) for o in rank])
        keep = emb.text_to_image >= 0
        if emb.image_features.shape[0] < 2 or not keep.any():
            return
        metrics = retrieval_metrics(emb.image_features, emb.text_features[keep], emb.text_to_image[keep])
        for k in (1, 5, 10):
            for key in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
                self.log(f"val/{key}", metrics[key], sync_dist=True)
        self.log("val/loss", self._validation_loss(emb), sync_dist=True)

    def _validation_loss(self, emb) -> float:
        """Mean loss of the held-out images with their first captions, in batches of val_loss_batch_size."""
        first: dict[int, int] = {}
        for row, image in enumerate(emb.text_to_image.tolist()):
            if image >= 0:
                first.setdefault(image, row)
        images = sorted(first)
        image_features = emb.image_features[images]
        text_features = emb.text_features[[first[i] for i in images]]
        size = self.hparams.val_loss_batch_size
        scale, bias = self._val_scalars
        losses = [self._loss_of(image_features[i:i + size], text_features[i:i + size], scale, bias, gather=False)
                  for i in range(0, len(images), size) if len(images[i:i + size]) > 1]
        return torch.stack(losses).mean().item()
