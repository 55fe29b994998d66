"""The LightningModule: the contrastive step, its optimizer and schedule, and validation.

The model, the loss and the callbacks that watch the run come in built (`multimodal.recipe` builds
them from the `model:` section of the configs). AdamW with decoupled weight decay on weight
matrices only (`multimodal.optim`), a per-step linear-warmup + cosine schedule, and `logit_scale`
clamped to [0, ln 100] after every optimizer step (CLIP, section 2.5: "clipped to prevent scaling
the logits by more than 100").

A step reads no device value on the host: a loss that is not finite on some rank becomes a flag on
the device that fused AdamW takes as its `found_inf`, so the update is skipped there; the callbacks
of `multimodal.monitor` count such steps and read the counts only on logging steps.
"""

import math
from collections.abc import Sequence
from dataclasses import replace

import pytorch_lightning as pl
import torch

from multimodal import distributed
from multimodal.accumulate import cached_step
from multimodal.checkpoint import ExactResume, FinalCheckpoint
from multimodal.data.batch import EvalBatch, TrainBatch
from multimodal.distributed import max_over_ranks_
from multimodal.errors import UserError
from multimodal.eval.embed import collect, encode_batch
from multimodal.eval.retrieval import evaluate_embeddings, first_caption_loss
from multimodal.fsdp import scalar_state, vectorise_scalars
from multimodal.loss import ContrastiveLoss
from multimodal.model import CLIP
from multimodal.monitor import is_logging_step
from multimodal.optim import param_groups, warmup_cosine

MAX_LOGIT_SCALE = math.log(100)


class CLIPModule(pl.LightningModule):
    def __init__(self, model: CLIP, loss: ContrastiveLoss, *, lr: float = 5e-4, weight_decay: float = 0.2,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.0, micro_batches: int = 1, val_loss_batch_size: int = 256,
                 callbacks: Sequence[pl.Callback] = ()):
        """`model` and `loss` as built; AdamW's settings and the schedule's (`multimodal.recipe` documents
        each); `micro_batches` gradient-cached chunks per batch; the `callbacks` the run needs."""
        super().__init__()
        self.model, self.loss = model, loss
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.micro_batches, self.val_loss_batch_size = micro_batches, val_loss_batch_size
        self._callbacks = list(callbacks)
        # as built: FSDP flattens parameters, and weight decay goes by the original shapes
        self._param_ndims = {name: p.ndim for name, p in model.named_parameters()}
        self.nonfinite: torch.Tensor | None = None  # the last training step's flag: 1.0 when its loss was not finite
        self._val_scalars: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._val_outputs: list = []

    def configure_callbacks(self) -> list[pl.Callback]:
        return [*self._callbacks, ExactResume(), FinalCheckpoint()]

    def configure_optimizers(self):
        groups = param_groups(self.model, self.weight_decay, self._param_ndims)
        # Fused AdamW (CPU and CUDA): one kernel per step instead of several per parameter, and it skips a
        # non-finite step on the device (`optimizer_step`). Not under fp16 AMP, whose scaler unscales
        # gradients before clipping, which Lightning allows only for an optimizer that does not.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps, fused=scaler is None)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_model(self) -> None:
        """Before the strategy wraps the model: FSDP needs the loss scalars as 1-element vectors
        (checkpoints keep open_clip's 0-d shape: `on_save_checkpoint`)."""
        if self._fsdp:
            vectorise_scalars(self.model)

    @property
    def _fsdp(self) -> bool:
        return self._trainer is not None and "FSDP" in type(self.trainer.strategy).__name__

    def on_fit_start(self) -> None:
        """Refuses micro-batches under FSDP. On CUDA, training leaves cuDNN's attention out of SDPA's choices
        (flash and memory-efficient attention serve the same shapes): `multimodal train` of ViT-B-32, eager,
        bf16, stopped after NaN losses from its second step on an H200 (torch 2.11, 2026-12-04; compiled, the
        same run was finite), the signature of cuDNN's SDPA backward returning NaN gradients for masked
        attention on Hopper (pytorch/pytorch#196678), here the text tower's causal mask. Forward passes
        (embed, eval) are unaffected."""
        if self.micro_batches > 1 and self._fsdp:
            raise UserError("model.micro_batches needs whole parameters on every rank: use the ddp strategy "
                            "(FSDP shards them), or set model.micro_batches to 1.")
        if self.device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        scalar_state(checkpoint.get("state_dict", {}))  # (1,) under FSDP: saved as open_clip's ()

    def _loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The loss of unit features with the model's temperature (and bias), gathered over ranks."""
        return self.loss(image_features, text_features, self.model.logit_scale.exp(), self.model.logit_bias)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor:
        if self.micro_batches > 1:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16 AMP's loss scale
            loss, surrogate = cached_step(self.model, batch.image, batch.text, self._loss,
                                          self.micro_batches, scaler.get_scale() if scaler else 1.0)
        else:
            terms = self.loss.terms(self.model, batch.image, batch.text, length=batch.text_length or None)
            loss = surrogate = sum(terms.values())
            if len(terms) > 1:  # CoCa: the contrastive and the captioning term
                for name, term in terms.items():
                    self.log(f"train/{name}", term.detach())
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

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        """Embeds every image and caption of the held-out shards (finished by the DataModule)."""
        _, images, texts = encode_batch(self.model, batch)  # decoded and normalised by the DataModule
        # The loss's scalars as this step sees them: inside the strategy's forward, where an FSDP
        # model holds whole parameters (outside it, a rank may hold none of logit_scale).
        bias = self.model.logit_bias
        self._val_scalars = (self.model.logit_scale.detach().exp().float().cpu(),
                             bias.detach().float().cpu() if bias is not None else None)
        if batch.part < 0:  # padding (ShardDataModule.val_dataloader): towers run, results dropped
            return
        rows = replace(batch, images=None, texts=None, jpegs=None)  # keep no pixels or tokens
        self._val_outputs.append((rows, images, texts))

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if self.trainer.sanity_checking:
            return
        # Each rank embedded every W-th part; every rank scores the whole set, in part order, so
        # the figures do not depend on the number of ranks.
        emb = collect([o for rank in distributed.all_gather_objects(outputs) for o in rank])
        if emb.image_features.shape[0] < 2 or not (emb.text_to_image >= 0).any():
            return  # too small a set to score
        metrics, _, _ = evaluate_embeddings(emb)
        for k in (1, 5, 10):
            for key in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
                self.log(f"val/{key}", metrics[key], sync_dist=True)
        scale, bias = self._val_scalars
        loss = first_caption_loss(emb.image_features, emb.text_features, emb.text_to_image,
                                  lambda i, t: self.loss(i, t, scale, bias, gather=False), self.val_loss_batch_size)
        self.log("val/loss", loss, sync_dist=True)
