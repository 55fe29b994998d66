"""Text generation over a decoder's next-token logits: greedy, top-k and top-p sampling, beam search.

A model enters only as `next_logits(tokens, rows)`: (N, T) token ids of the sequences still being
generated, and for each the batch item (image) it belongs to, give the (N, V) logits of the next
token. So this module knows nothing of CoCa or open_clip (whose `generate` leans on `transformers`
classes that newer releases removed); the captioner supplies the callback.

- `top_k_filter`, `top_p_filter`: logits outside the kept set become -inf. Top-p (nucleus) keeps the
  smallest set of most likely tokens whose probability reaches p (Holtzman et al. 2019, arXiv:1904.09751).
- `sample_next`: temperature, then the strategy's filter, then a draw from `generator`.
- `sample`: greedy and sampling, all sequences batched; a finished sequence gets only padding.
- `beam_search`: `beams` hypotheses per item, batched as (B * beams, T), scored as
  sum log p / length ** length_penalty (Wu et al. 2016, arXiv:1609.08144, with their lp simplified),
  stopping once no live hypothesis can beat the finished ones.
- `generate`: `Decoding` says which.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multimodal.errors import UserError

STRATEGIES = ("greedy", "top_k", "top_p", "beam")
# |length_penalty| beyond this means nothing more (a length's 10th power already outweighs any log-probability)
# and, with a long caption's length, overflows float32
MAX_LENGTH_PENALTY = 10.0
_DERIVED_ROWS = 8  # (V,) rows per sequence beside its logits: log-probabilities, scores, their top-k, a sort
NextLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, T) tokens, (N,) rows -> (N, V)


@dataclass(frozen=True)
class Decoding:
    """How to generate. `temperature`, `top_k` and `top_p` concern sampling (temperature 0: argmax);
    `beams` and `length_penalty` concern beam search, which ignores the others."""

    strategy: str = "greedy"  # greedy | top_k | top_p | beam
    max_length: int = 30  # generated tokens, not counting the prompt
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    beams: int = 4
    length_penalty: float = 1.0  # beam score: sum log p / length ** length_penalty

    def check(self, setting: str = "{}") -> None:
        """Refuse a setting no decoding can follow, in one sentence; `setting` names the settings in the caller's
        words ("--{}" on a command line). A temperature is 0 (greedy) or positive and finite; a length penalty is
        finite and within +-MAX_LENGTH_PENALTY (negative ones favour shorter captions)."""
        name = setting.format
        if self.strategy not in STRATEGIES:
            raise UserError(f"Unknown decoding strategy {self.strategy!r}: choose greedy, top_k, top_p or beam.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"{name('top_p')} {self.top_p} is outside (0, 1]: give the probability mass to sample "
                            "from, such as 0.9.")
        if not self.top_k >= 1:
            raise UserError(f"{name('top_k')} {self.top_k} is below 1: give how many of the most likely tokens to "
                            "sample from, such as 50.")
        if not 0 <= self.temperature < math.inf:
            raise UserError(f"{name('temperature')} {self.temperature} is not 0 or a positive finite number: give 0 "
                            "for greedy decoding or a positive value such as 1.0.")
        if not self.beams >= 1:
            raise UserError(f"{name('beams')} {self.beams} is below 1: give how many hypotheses beam search keeps, "
                            "such as 4.")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise UserError(f"{name('length_penalty')} {self.length_penalty} is not a number within "
                            f"+-{MAX_LENGTH_PENALTY:g}: give the power of the length that divides a beam's "
                            "log-probability, such as 1.0 (0: none, negative: shorter captions).")
        if not self.max_length >= 1:
            raise UserError(f"{name('max_length')} {self.max_length} is below 1: give how many tokens to generate, "
                            "such as 30.")

    def peak_bytes(self, batch: int, vocab: int) -> int:
        """About the most memory that decoding `batch` items at once holds, in bytes, for a `next_logits` that
        computes the logits of every position, as a decoder without a cache does (CoCa's): each sequence's
        float32 logits at its max_length + 1 positions, and the few (V,) rows that sampling or beam search
        derive from the last of them (measured: within 25% of the peak of tiny-coca's captions). Beam search
        decodes `beams` sequences an item, the others one."""
        sequences = batch * (self.beams if self.strategy == "beam" else 1)
        return sequences * (self.max_length + 1 + _DERIVED_ROWS) * vocab * 4


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(..., V) logits with all but the k largest of each row set to -inf (of tied values, exactly k stay)."""
    if k >= logits.shape[-1]:
        return logits
    kept = logits.topk(k, dim=-1).indices
    return torch.full_like(logits, float("-inf")).scatter(-1, kept, logits.gather(-1, kept))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(..., V) logits with -inf outside the smallest set of most likely tokens whose probability reaches p:
    in descending order, a token stays while the probability before it is below p (so the first always does).
    Of tied tokens the lower ids come first, as in argmax."""
    if p >= 1:  # all of them, also where the rounding of a cumulative sum would reach 1 early
        return logits
    ordered, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = ordered.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
    before = probs.cumsum(-1) - probs
    drop = torch.empty_like(before, dtype=torch.bool).scatter(-1, order, before >= p)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, decoding: Decoding, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) next tokens drawn from (N, V) logits: argmax for greedy or temperature 0; otherwise logits /
    temperature, filtered by top_k or top_p, drawn with `generator`."""
    if decoding.strategy == "greedy" or decoding.temperature == 0:
        return logits.argmax(-1)
    # shifted so the largest is 0 before the division, and by no less than float32's smallest normal number:
    # however small the temperature, the most likely token keeps logit 0 and the others fall towards -inf,
    # never inf - inf (a temperature of 1e-40 draws among the most likely tokens, as its limit 0 would)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(decoding.temperature, torch.finfo(torch.float32).tiny)
    if decoding.strategy == "top_k":
        logits = top_k_filter(logits, decoding.top_k)
    elif decoding.strategy == "top_p":
        logits = top_p_filter(logits, decoding.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def sample(next_logits: NextLogits, start: torch.Tensor, end_token: int, pad_token: int, decoding: Decoding,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy or sampled continuations of the (B, T0) prompts `start`, one token a step, as (B, T0 + L):
    a sequence keeps its end_token and gets pad_token after it; L <= max_length, fewer when all have ended."""
    rows = torch.arange(start.shape[0], device=start.device)
    tokens, live = start, torch.ones_like(rows, dtype=torch.bool)
    for _ in range(decoding.max_length):
        step = torch.full_like(rows, pad_token)
        step[live] = sample_next(next_logits(tokens[live], rows[live]), decoding, generator)
        tokens = torch.cat([tokens, step[:, None]], dim=1)
        live &= step != end_token
        if not live.any():
            break
    return tokens


def beam_search(next_logits: NextLogits, start: torch.Tensor, end_token: int, pad_token: int, beams: int,
                max_length: int, length_penalty: float = 1.0) -> torch.Tensor:
    """The best hypothesis per item of (B, T0) prompts `start`, as (B, T0 + L), padded after end_token.

    Each step extends the live hypotheses (cumulative log p) by every token: of the best `beams`
    extensions, those ending in end_token are finished and kept if among the item's `beams` best by
    sum log p / length ** length_penalty (length: generated tokens with the end token); the best
    `beams` other extensions stay live. An item is done once it holds `beams` finished hypotheses and
    no live one can reach the worst of their scores; at max_length the unfinished ones are scored the
    same way. With beams=1 and length_penalty=0 this is greedy decoding.
    """
    B, T0 = start.shape
    K, inf = beams, float("inf")
    rows = torch.arange(B, device=start.device).repeat_interleave(K)  # (B*K,) the item of each hypothesis
    tokens = start[:, None].expand(B, K, T0)  # (B, K, T0 + t)
    scores = torch.full((B, K), -inf, device=start.device)  # live sum log p: one copy of the prompt at first
    scores[:, 0] = 0
    done_scores = torch.full_like(scores, -inf)  # finished, length-penalised
    done_tokens = torch.full((B, K, max_length), pad_token, dtype=torch.long, device=start.device)
    for t in range(1, max_length + 1):
        live = scores.flatten().isfinite()
        live_logp = next_logits(tokens.flatten(0, 1)[live], rows[live]).float().log_softmax(-1)  # (N, V)
        V = live_logp.shape[-1]
        logp = live_logp.new_full((B * K, V), -inf)
        logp[live] = live_logp
        extended = (scores[..., None] + logp.view(B, K, V)).view(B, K * V)

        top, index = extended.topk(K, dim=1)  # those of the best K extensions that end are finished
        ended = torch.where(index % V == end_token, top / t**length_penalty, -inf)
        finished = F.pad(_pick(tokens[..., T0:], index // V), (0, 1), value=end_token)
        done_scores, done_tokens = _keep_best(done_scores, done_tokens, ended, finished, pad_token)

        extended.view(B, K, V)[..., end_token] = -inf  # the best K others stay live
        scores, index = extended.topk(K, dim=1)
        tokens = torch.cat([_pick(tokens, index // V), (index % V)[..., None]], dim=-1)
        if t == max_length:
            unfinished = scores / t**length_penalty
            done_scores, done_tokens = _keep_best(done_scores, done_tokens, unfinished, tokens[..., T0:], pad_token)
            break
        # sum log p only falls, and s / L ** lp is monotone in L, so the best a live hypothesis can
        # reach is at its next length or at max_length
        best_live = scores.max(dim=1).values
        reachable = torch.maximum(best_live / (t + 1) ** length_penalty, best_live / max_length**length_penalty)
        scores = scores.masked_fill((done_scores.min(dim=1).values >= reachable)[:, None], -inf)
        if not scores.isfinite().any():
            break

    best = done_tokens[torch.arange(B, device=start.device), done_scores.argmax(dim=1)]  # (B, max_length)
    is_end = best == end_token
    lengths = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1) + 1, max_length)
    return torch.cat([start, best[:, : int(lengths.max())]], dim=1)


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, T) hypotheses at (B, K') indices -> (B, K', T)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _keep_best(scores: torch.Tensor, tokens: torch.Tensor, new_scores: torch.Tensor, new_tokens: torch.Tensor,
               pad_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K best of finished hypotheses (B, K) `scores`, (B, K, M) `tokens` and new ones (B, K', T <= M)."""
    new_tokens = F.pad(new_tokens, (0, tokens.shape[-1] - new_tokens.shape[-1]), value=pad_token)
    scores, best = torch.cat([scores, new_scores], dim=1).topk(scores.shape[1], dim=1)
    return scores, _pick(torch.cat([tokens, new_tokens], dim=1), best)


def generate(next_logits: NextLogits, start: torch.Tensor, end_token: int, pad_token: int, decoding: Decoding,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T0 + L) long: the (B, T0) prompts `start`, then up to `decoding.max_length` generated tokens;
    a sequence that produced end_token keeps it and is padded with pad_token after it.

    next_logits(tokens (N, T) long, rows (N,) long) -> (N, V) float: the logits of the next token of
    each sequence, rows[i] naming the batch item of sequence i (beam search holds several per item)."""
    decoding.check()
    if decoding.strategy == "beam":
        return beam_search(next_logits, start, end_token, pad_token, decoding.beams, decoding.max_length,
                           decoding.length_penalty)
    return sample(next_logits, start, end_token, pad_token, decoding, generator)
