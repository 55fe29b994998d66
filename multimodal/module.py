"""The LightningModule: contrastive training of the two-tower model.

Its constructor arguments are the `model:` section of the YAML configs. AdamW with decoupled
weight decay on weight matrices only (`multimodal.optim`), a per-step linear-warmup + cosine
schedule, and `logit_scale` clamped to [0, ln 100] after every optimizer step (CLIP, section 2.5:
"clipped to prevent scaling the logits by more than 100").
"""

import math
import time

import pytorch_lightning as pl
import torch

from multimodal import distributed
from multimodal.eval.embed import collect, concat
from multimodal.eval.retrieval import retrieval_metrics
from multimodal.loss import clip_loss
from multimodal.model import create_model
from multimodal.optim import param_groups, warmup_cosine

MAX_LOGIT_SCALE = math.log(100)


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
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model_name)
        self._last_batch_start: float | None = None
        self.skipped_samples = 0
        self._val_outputs: list = []

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=hp.betas, eps=hp.eps)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_start is not None:
            per_device = batch["image"].shape[0] / (now - self._last_batch_start)
            self.log("train/samples_per_second_per_device", per_device)
            self.log("train/samples_per_second", per_device * self.trainer.world_size, prog_bar=True)
        self._last_batch_start = now

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image_features, text_features, logit_scale = self.model(batch["image"], batch["text"])
        loss = clip_loss(image_features, text_features, logit_scale)
        self.skipped_samples += int(batch["skipped"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", logit_scale.detach())
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/skipped_samples", float(self.skipped_samples))
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Embeds every image and caption of the held-out shards (`EmbedBatches` batches)."""
        images = self.model.encode_image(batch["images"]).float() if batch["images"] is not None else None
        texts = self.model.encode_text(batch["texts"]).float() if batch["texts"] is not None else None
        if images is not None and images.shape[0] > 1:
            # The loss of the batch's images against their first captions, without gathering.
            first = {}
            for row, r in enumerate(batch["text_rows"]):
                first.setdefault(r["image"], row)
            loss = clip_loss(images, texts[[first[i] for i in range(images.shape[0])]],
                             self.model.logit_scale.exp(), gather=False)
            self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=images.shape[0])
        self._val_outputs.append((batch, images.cpu() if images is not None else None,
                                  texts.cpu() if texts is not None else None))

    def on_validation_epoch_end(self) -> None:
        outputs, self._val_outputs = self._val_outputs, []
        if self.trainer.sanity_checking:
            return
        # Each rank embedded its share of the shards; every rank scores the whole set.
        emb = concat(distributed.all_gather_objects(collect(outputs)))
        keep = emb.text_to_image >= 0
        if emb.image_features.shape[0] == 0 or not keep.any():
            return
        metrics = retrieval_metrics(emb.image_features, emb.text_features[keep], emb.text_to_image[keep])
        for k in (1, 5, 10):
            for key in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
                self.log(f"val/{key}", metrics[key], sync_dist=True)

    def on_train_end(self) -> None:
        if self.skipped_samples:
            print(f"Skipped {self.skipped_samples} undecodable samples on rank {self.global_rank}.")
