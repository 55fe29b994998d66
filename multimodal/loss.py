"""Contrastive losses as functions of tensors.

`clip_loss` is the symmetric InfoNCE loss of CLIP (Radford et al. 2021, arXiv:2103.00020):
the mean of the image->text and text->image cross-entropies over scaled cosine similarities.
`logit_scale` is the multiplier itself (the exp of the model's learnable log-temperature), as in
open_clip's `ClipLoss`.

With a process group of W > 1 ranks, each rank scores its B local rows against all W * B gathered
columns (open_clip's "local loss"), labels offset by rank * B. The mean of the ranks' losses then
equals the single-process loss on the concatenated batch, and the gradients DDP averages equal the
single-process gradients (tests/test_distributed.py proves both).

`caption_loss` is CoCa's captioning loss (Yu et al. 2022, arXiv:2205.01917): the token cross-entropy
of teacher-forced next-token logits, padding ignored; it is local to each rank (no gather).

`ClipLoss`, `SigLipLoss` and `CocaLoss` are thin callables over these functions with one call
signature, so a run chooses its loss once (`LOSSES`) and its step does not branch on a name:
`terms(model, images, tokens)` gives the named terms of a batch, whose sum is the training loss.
Each class also says what a run needs for it (the model's initial temperature and bias, a caption
decoder, whether gradient-cached micro-batches can compute it) and builds itself from the settings
it uses (`from_settings`), so the recipe checks and builds any loss the same way.
"""

import math

import torch
import torch.nn.functional as F

from multimodal import distributed


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE over (B, D) L2-normalised features.

    With `gather` (training) and W > 1 ranks, scores the local rows against all ranks' features;
    `gather=False` scores the given batch alone (evaluation, where ranks may hold different sizes).
    """
    offset = 0
    if gather and distributed.is_distributed():
        all_image = distributed.gather_features(image_features)  # (W*B, D)
        all_text = distributed.gather_features(text_features)  # (W*B, D)
        logits_per_image = logit_scale * image_features @ all_text.T  # (B, W*B)
        logits_per_text = logit_scale * text_features @ all_image.T  # (B, W*B)
        offset = distributed.rank() * image_features.shape[0]
    else:  # one process: the text->image logits are the transpose, no second matmul
        logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
        logits_per_text = logits_per_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, arXiv:2303.15343) over (B, D) unit features.

    Every (image, text) pair is an independent binary problem, positive on the diagonal:
    `-sum(log sigmoid(label * (logit_scale * x.y + logit_bias))) / B`, as open_clip's `SigLipLoss`.
    With `gather` and W > 1 ranks, the local images are scored against all ranks' texts (gathered
    with gradient) and the mean of the ranks' losses equals the single-process loss on the whole
    batch, as for `clip_loss`. open_clip passes texts around a ring instead, which holds one
    neighbour's texts at a time; at CLIP batch sizes the gathered (W*B, D) texts are small.
    """
    offset = 0
    if gather and distributed.is_distributed():
        text_features = distributed.gather_features(text_features)  # (W*B, D)
        offset = distributed.rank() * image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, W*B)
    batch = image_features.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(batch, device=logits.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / batch


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) next-token logits against (B, T) token ids, over the tokens that are
    not `pad_id` (open_clip's tokenizer pads with 0), computed in float32 (bf16 logits lose the tail)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad_id)  # no transposed copy


class ContrastiveLoss:
    """A contrastive loss chosen once (`model.loss`), called as
    `loss(image_features, text_features, logit_scale, logit_bias, gather=...)`.

    What a run needs for it, declared by each class: `init_logit_scale` and `init_logit_bias`, the
    model scalars the loss starts from (None: open_clip's ln(1 / 0.07) temperature, and no bias);
    `needs_caption_decoder`, a model with a caption decoder (a CoCa architecture), and only then;
    `supports_micro_batches`, a function of the towers' features alone, which gradient caching
    (`multimodal.accumulate`) computes over micro-batches. Plain callables, not modules: no
    parameters, and no module hooks in the step (a FLOP counter's would hook the bias, a leaf).
    """

    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    needs_caption_decoder = False
    supports_micro_batches = True

    @classmethod
    def from_settings(cls, *, caption_loss_weight: float = 2.0) -> "ContrastiveLoss":
        """The loss as the `model:` section configures it. Every loss is handed every loss setting and
        takes those it uses (this one: none), so the caller need not know which loss uses which."""
        return cls()

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor | None = None, *, gather: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def terms(self, model, images: torch.Tensor, tokens: torch.Tensor, *, gather: bool = True,
              length: int | None = None) -> dict[str, torch.Tensor]:
        """The named loss terms of a batch through `model` (a `multimodal.model.CLIP`); their sum is the
        training loss. `length`: the batch's longest caption in tokens, where known (`TrainBatch.text_length`)."""
        return {"loss": self(model.encode_image(images), model.encode_text(tokens), model.logit_scale.exp(),
                             model.logit_bias, gather=gather)}


class ClipLoss(ContrastiveLoss):
    """`clip_loss`: the bias, if the model has one, is not used."""

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, *, gather: bool = True) -> torch.Tensor:
        return clip_loss(image_features, text_features, logit_scale, gather=gather)


class SigLipLoss(ContrastiveLoss):
    """`siglip_loss`, from SigLIP's initial temperature 10 and bias -10 (arXiv:2303.15343, section 3)."""

    init_logit_scale = math.log(10)
    init_logit_bias = -10.0

    def __call__(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, *, gather: bool = True) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("siglip_loss needs a model with a logit_bias (create it with init_logit_bias).")
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, gather=gather)


class CocaLoss(ClipLoss):
    """CoCa's: `clip_loss` (gathered) plus `caption_loss_weight` x `caption_loss` of the decoder's teacher-forced
    logits on the batch's own captions (local), as open_clip's `CoCaLoss` (weights 1 and 2)."""

    needs_caption_decoder = True
    supports_micro_batches = False  # the captioning term needs each sample's decoder graph, not cached features

    def __init__(self, caption_loss_weight: float = 2.0):
        self.caption_loss_weight = caption_loss_weight

    @classmethod
    def from_settings(cls, *, caption_loss_weight: float = 2.0) -> "CocaLoss":
        return cls(caption_loss_weight)

    def terms(self, model, images: torch.Tensor, tokens: torch.Tensor, *, gather: bool = True,
              length: int | None = None) -> dict[str, torch.Tensor]:
        image_features, text_features, logits, labels = model.forward_captions(images, tokens, length)
        return {"contrastive_loss": self(image_features, text_features, model.logit_scale.exp(), gather=gather),
                "caption_loss": self.caption_loss_weight * caption_loss(logits, labels)}


LOSSES: dict[str, type[ContrastiveLoss]] = {"clip": ClipLoss, "siglip": SigLipLoss, "coca": CocaLoss}
