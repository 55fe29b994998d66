"""Nearest neighbours in an embedding folder, and contact sheets of the images found or captioned."""

import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from multimodal.data.sources import fetch_images, read_image_file
from multimodal.eval.embed import Embeddings


def top_k(candidates: torch.Tensor, query: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """(row, cosine score) of the k best of (N, D) `candidates` for a (D,) query, best first."""
    scores = F.normalize(candidates.float(), dim=-1) @ F.normalize(query.float(), dim=-1)
    values, rows = scores.topk(min(k, scores.shape[0]))
    return list(zip(rows.tolist(), values.tolist()))


def load_images(emb: Embeddings, rows: list[int]) -> list[Image.Image | None]:
    """The images of `rows` of an embedding set: from their files, or from their shards."""
    return images_of([emb.image_rows[row] for row in rows])


def images_of(metas: list[dict]) -> list[Image.Image | None]:
    """The images that index rows (key and shard url, or file_name) name; None where one cannot be read."""
    out: list[Image.Image | None] = [None] * len(metas)
    by_url: dict[str, list[tuple[int, str]]] = {}
    for i, meta in enumerate(metas):
        if "url" in meta:
            by_url.setdefault(meta["url"], []).append((i, meta["key"]))
        elif Path(meta.get("file_name", "")).is_file():
            out[i] = read_image_file(Path(meta["file_name"]))
    for url, wanted in by_url.items():
        found = fetch_images(url, {key for _, key in wanted})
        for i, key in wanted:
            out[i] = found.get(key)
    return out


def contact_sheet(rows: list[tuple[str, list[tuple[Image.Image | None, str]]]], tile: int = 128) -> Image.Image:
    """One line per query: its title, then its images, each captioned (with its score)."""
    font = ImageFont.load_default(size=max(10, tile // 10))
    cols = max(len(items) for _, items in rows)
    pad, title_h, label_h = 6, tile // 5, tile // 7
    line_h = title_h + tile + label_h + pad
    sheet = Image.new("RGB", (pad + cols * (tile + pad), pad + len(rows) * line_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, items) in enumerate(rows):
        y = pad + r * line_h
        draw.text((pad, y), title, fill="black", font=font)
        for c, (image, label) in enumerate(items):
            x = pad + c * (tile + pad)
            if image is None:
                draw.rectangle((x, y + title_h, x + tile, y + title_h + tile), outline="gray")
            else:
                thumb = ImageOps.contain(image, (tile, tile), Image.Resampling.BICUBIC)
                sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + title_h + (tile - thumb.height) // 2))
            draw.text((x, y + title_h + tile + 1), label, fill="black", font=font)
    return sheet


def first_captions(emb: Embeddings) -> dict[int, str]:
    """Image row -> its first caption, where the set has captions."""
    out: dict[int, str] = {}
    for row, image in zip(emb.text_rows, emb.text_to_image.tolist()):
        if image >= 0:
            out.setdefault(image, row.get("caption", ""))
    return out


def captioned_sheet(rows: list[dict], tile: int = 192, cols: int = 4) -> Image.Image:
    """Images (index rows with their "caption") in a grid, each with its caption wrapped beneath it."""
    font = ImageFont.load_default(size=max(10, tile // 14))
    pad, text_h = 6, 4 * (tile // 12)
    images = images_of(rows)
    lines = -(-len(rows) // cols)
    sheet = Image.new("RGB", (pad + cols * (tile + pad), pad + lines * (tile + text_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, row) in enumerate(zip(images, rows)):
        x, y = pad + (i % cols) * (tile + pad), pad + (i // cols) * (tile + text_h + pad)
        if image is None:
            draw.rectangle((x, y, x + tile, y + tile), outline="gray")
        else:
            thumb = ImageOps.contain(image, (tile, tile), Image.Resampling.BICUBIC)
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        wrapped = textwrap.wrap(row.get("caption", ""), width=max(8, tile // 7))[:4]
        draw.multiline_text((x, y + tile + 2), "\n".join(wrapped), fill="black", font=font, spacing=1)
    return sheet
