"""Captions written by a CoCa model: images in, text out, part by part, resumable.

`caption_images` encodes a batch of images once and lets `multimodal.decoding.generate` write each
caption a token at a time from the caption decoder's next-token logits (greedy, top-k, top-p or beam
search). `caption_source` runs it over a `Source` (shards, an image folder) in the batches that
embedding uses, each part with its own seeded random generator, so that a part's captions are the
same whether or not the run was interrupted before it. `CaptionWriter` keeps finished parts, one
JSON-lines file each, and joins them into the output file at the end (`multimodal caption`).
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from multimodal.data.batch import EvalBatch, finish, jpegs_on_device
from multimodal.data.pixels import EvalTransform
from multimodal.data.sources import EvalBatches, Source
from multimodal.decoding import Decoding, generate
from multimodal.errors import UserError
from multimodal.eval.embed import PART, autocast, settings_changed
from multimodal.files import write_json, write_text
from multimodal.model import CLIP

PAD = 0  # open_clip's tokenizer pads with 0


def check_captioner(model: CLIP, what: str, setting: str = "{}") -> None:
    """A UserError unless `model` (named `what`) has a caption decoder; `setting` names the option `pretrained`
    in the caller's words ("--{}" on a command line)."""
    if not model.has_caption_decoder:
        raise UserError(f"{what} is a {model.architecture.name} model, which has no caption decoder: pass a CoCa "
                        f"checkpoint (trained with model.loss coca, or coca_ViT-B-32 with "
                        f"{setting.format('pretrained')}).")


@torch.no_grad()
def caption_images(model: CLIP, images: torch.Tensor, decoding: Decoding,
                   generator: torch.Generator | None = None) -> list[str]:
    """Captions of (B, 3, H, W) normalised images on the model's device."""
    tokenizer = model.architecture.tokenizer
    image_tokens = model.image_tokens(images)
    start = torch.full((images.shape[0], 1), tokenizer.sot_token_id, dtype=torch.long, device=images.device)
    longest = min(decoding.max_length, model.architecture.context_length - 1)
    tokens = generate(lambda t, rows: model.next_token_logits(image_tokens[rows], t).float(), start,
                      tokenizer.eot_token_id, PAD, dataclasses.replace(decoding, max_length=longest), generator)
    return [text(tokenizer, row) for row in tokens.tolist()]


def text(tokenizer, ids: list[int]) -> str:
    """The words of generated token ids: up to the end token, without the start token and padding."""
    if tokenizer.eot_token_id in ids:
        ids = ids[:ids.index(tokenizer.eot_token_id)]
    return tokenizer.decode([i for i in ids if i not in (tokenizer.sot_token_id, PAD)]).strip()


def caption_source(model: CLIP, source: Source, parts: list[int], decoding: Decoding, seed: int = 0,
                   batch_size: int = 32, num_workers: int = 0, decode: str = "auto"
                   ) -> Iterator[tuple[EvalBatch, list[str]]]:
    """(batch, captions of its images) for every batch of `parts`, in order; the batch's `image_rows`
    say which image each caption is of, its `text_rows` (with "image") hold the reference captions.
    Part p samples with a generator seeded by (seed, p)."""
    device = next(model.parameters()).device
    preprocess = EvalTransform.of(model.architecture.preprocessing)
    batches = EvalBatches(source, parts, preprocess, model.architecture.tokenizer, batch_size,
                          jpegs_on_device(decode, device))
    generators: dict[int, torch.Generator] = {}
    model.eval()
    for batch in DataLoader(batches, batch_size=None, num_workers=min(num_workers, len(parts)),
                            pin_memory=device.type == "cuda"):
        batch = finish(batch.to(device), device, preprocess)
        if batch.images is None:
            yield batch, []
            continue
        generator = generators.setdefault(batch.part,
                                          torch.Generator(device).manual_seed(seed * 1_000_003 + batch.part))
        with autocast(device):
            captions = caption_images(model, batch.images, decoding, generator)
        yield batch, captions


def collect_captions(batches) -> tuple[dict[str, str], dict[str, list[str]], list[dict]]:
    """From `caption_source`'s (batch, captions): generated caption and reference captions by image
    ("PART/KEY"), and the image rows with their "caption", in order."""
    generated, references, rows = {}, {}, []
    for batch, captions in batches:
        for i, (row, caption) in enumerate(zip(batch.image_rows, captions)):
            key = f"{batch.part}/{row.get('key', i)}"
            generated[key] = caption
            references[key] = [r["caption"] for r in batch.text_rows if r.get("image") == i]
            rows.append({**row, "caption": caption})
    return generated, references, rows


class CaptionWriter:
    """Finished parts as `OUT.parts/part-NNNNN.jsonl` (one {"key", ..., "caption"} a line), the settings that
    made them beside; `finish` joins them into OUT. A folder made with other settings is refused (`setting`
    names `overwrite` and `out` in the caller's words)."""

    def __init__(self, out: Path, settings: dict, overwrite: bool = False, setting: str = "{}"):
        self.out, self.folder = out, out.with_name(out.name + ".parts")
        info = self.folder / "settings.json"
        if settings_changed(info, settings, overwrite, "captions", setting):
            for done in self.folder.glob("part-*.jsonl"):
                done.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(info, settings)
        self.open: dict[int, list[dict]] = {}

    def done(self, part: int) -> bool:
        return (self.folder / f"{PART.format(part)}.jsonl").is_file()

    def add(self, batch: EvalBatch, captions: list[str]) -> list[dict]:
        """The rows of this batch's captions; a part is written when its last batch arrives."""
        rows = [{**row, "caption": caption} for row, caption in zip(batch.image_rows, captions)]
        self.open.setdefault(batch.part, []).extend(rows)
        if batch.last:
            lines = self.open.pop(batch.part)
            write_text(self.folder / f"{PART.format(batch.part)}.jsonl",
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        return rows

    def finish(self, num_parts: int) -> int:
        """OUT: every part's captions in part order; returns their number (0: OUT is left as it was)."""
        text = "".join((self.folder / f"{PART.format(p)}.jsonl").read_text(encoding="utf-8") for p in range(num_parts))
        if text:
            write_text(self.out, text)
        return text.count("\n")
