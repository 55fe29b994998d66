"""The two-tower CLIP model: a pure nn.Module around open_clip's image and text towers.

`encode_image` / `encode_text` return L2-normalised features; `logit_scale` is the learnable
log-temperature, initialised to ln(1 / 0.07) as in CLIP (arXiv:2103.00020, section 2.5).
The wrapped `towers` module is an open_clip model, so its state dict is an open_clip state dict.
Strategies adapt it from outside (`multimodal.fsdp`).
"""

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from multimodal.arch import Architecture


class CLIP(nn.Module):
    def __init__(self, towers: open_clip.CLIP, architecture: Architecture):
        super().__init__()
        self.towers = towers
        self.architecture = architecture  # what the data and evaluations need of it: tokenizer, transforms

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.towers.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """SigLIP's learnable bias, present when the model was created with `init_logit_bias`."""
        return getattr(self.towers, "logit_bias", None)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) unit-norm features."""
        return F.normalize(self.towers.encode_image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) unit-norm features."""
        return F.normalize(self.towers.encode_text(tokens), dim=-1)

    @property
    def has_caption_decoder(self) -> bool:
        """Whether the towers include CoCa's caption decoder (`open_clip.CoCa`)."""
        return hasattr(self.towers, "text_decoder")

    @property
    def caption_vocab_size(self) -> int:
        """CoCa: V, the tokens that `next_token_logits` scores."""
        return self.towers.text_decoder.text_projection.shape[-1]

    def forward_captions(self, images: torch.Tensor, tokens: torch.Tensor, length: int | None = None):
        """CoCa, teacher-forced: (image_features, text_features, logits (B, T, V), labels (B, T)): the decoder
        reads tokens[:, :T] with the image tokens and predicts tokens[:, 1:T + 1], T = L - 1.

        `length` (a host int, counted by the data pipeline: nothing is read from the device): the tokens of the
        batch's longest caption. The decoder then reads only that far (rounded up to a multiple of 8, so that
        a compiled step sees few shapes): what follows is padding, whose labels the caption loss ignores, and
        the decoder is causal, so the logits kept are those of the whole context. The (B, T, V) logits are
        most of a CoCa step's time and memory (V = 49,408), and captions are far shorter than the context."""
        image_features, image_tokens = self.towers._encode_image(images)  # unit features, as open_clip's CoCa
        text_features, token_embs = self.towers._encode_text(tokens)
        span = tokens.shape[1] - 1 if length is None else min(-(-length // 8) * 8, tokens.shape[1]) - 1
        logits = self.towers.text_decoder(image_tokens, token_embs[:, :span])
        return image_features, text_features, logits, tokens[:, 1:span + 1]

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """CoCa: (B, N, W) image tokens that the caption decoder attends to."""
        return self.towers._encode_image(images)[1]

    def next_token_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """CoCa: (B, V) logits of the token after (B, T) `tokens`, given the (B, N, W) `image_tokens`."""
        _, token_embs = self.towers._encode_text(tokens)
        return self.towers.text_decoder(image_tokens, token_embs)[:, -1]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """Returns (image_features, text_features, logit_scale.exp()) for `clip_loss`."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()


def create_model(architecture: Architecture, *, init_logit_scale: float | None = None,
                 init_logit_bias: float | None = None, patch_dropout: float | None = None) -> CLIP:
    """A randomly initialised model of `architecture` (`multimodal.arch.load`).

    `init_logit_bias` adds SigLIP's learnable bias (open_clip's `logit_bias`); `patch_dropout`
    drops that fraction of image patches in training (FLIP, arXiv:2212.00794).
    """
    kwargs = {}
    if init_logit_scale is not None:
        kwargs["init_logit_scale"] = init_logit_scale
    if init_logit_bias is not None:
        kwargs["init_logit_bias"] = init_logit_bias
    towers = architecture.create_towers(force_patch_dropout=patch_dropout, **kwargs)
    if hasattr(towers, "text_decoder"):
        init_caption_decoder(towers.text_decoder)
    return CLIP(towers, architecture)


@torch.no_grad()
def init_caption_decoder(decoder: nn.Module) -> None:
    """Initialise a CoCa caption decoder (open_clip's `MultimodalTransformer`) as open_clip means to.

    open_clip 3.3 leaves the decoder's `text_projection` as `torch.empty`, whatever memory held: its
    `MultimodalTransformer.init_parameters`, which would set it, reads attributes the class lacks and is
    never called, so a CoCa trained from scratch starts from garbage logits (a caption loss of 1e26 on one
    machine, 10.8 on another). The standard deviations are the ones that method states, as open_clip's
    text tower uses them.
    """
    width, layers = decoder.width, decoder.layers
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in (*decoder.resblocks, *decoder.cross_attn):
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(decoder.text_projection, std=width ** -0.5)

