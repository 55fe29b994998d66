"""Nearest neighbours in an embedding folder (scored exactly, in memory) or an index folder (`eval/index.py`:
approximate, the candidates re-scored exactly), and contact sheets of the images found or captioned."""

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from multimodal.data.sources import fetch_images, read_image_file
from multimodal.errors import UserError
from multimodal.eval.embed import Embeddings, load_folder, read_info


def top_k(candidates: torch.Tensor, query: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """(row, cosine score) of the k best of (N, D) `candidates` for a (D,) query, best first."""
    scores = F.normalize(candidates.float(), dim=-1) @ F.normalize(query.float(), dim=-1)
    values, rows = scores.topk(min(k, scores.shape[0]))
    return list(zip(rows.tolist(), values.tolist()))


@dataclass
class Hit:
    row: int  # the row among the searched embeddings (an index's: among all the folder's parts)
    score: float  # cosine similarity to the query
    meta: dict  # the row's index entry: key, url or file_name, caption (an image's first caption)


class Collection:
    """What `search --index` names: an embedding folder (every row scored exactly, in memory) or an index folder
    from `multimodal index` (approximate; the candidates re-scored exactly from the embedding folder's parts).
    `target`: "images" or "texts" (default: the images where there are any; an index holds one kind)."""

    def __init__(self, path: Path, target: str | None = None, setting: str | None = None,
                 emb: Embeddings | None = None):
        from multimodal.eval import index

        self.path = path
        if index.is_index(path):
            self.searcher, self.info = index.open_index(path)
            self.target = {"image": "images", "text": "texts"}[self.info["kind"]]
            if target not in (None, self.target):
                raise UserError(f"Index {path} holds {self.target}, not {target}: build an index of the folder's "
                                f"{target} with `multimodal index --kind {target[:-1]}`.")
            self.dim, self.count = self.info["dim"], self.info["count"]
            return
        self.info, self.searcher = read_info(path, setting), None
        self.emb = emb if emb is not None else load_folder(path)  # `emb`: the folder, already read
        if not (self.emb.image_features.shape[0] or self.emb.text_features.shape[0]):
            raise UserError(f"{path} holds no embeddings to search (every sample was skipped when it was made): "
                            "embed readable images or texts with `multimodal embed`.")
        self.target = target or ("images" if self.emb.image_features.shape[0] else "texts")
        self.candidates = self.emb.image_features if self.target == "images" else self.emb.text_features
        if self.candidates.shape[0] == 0:
            other = "texts" if self.target == "images" else "images"
            raise UserError(f"{path} holds no {self.target[:-1]} embeddings to search: search its {other} with "
                            f"--target {other}.")
        self.dim, self.count = self.candidates.shape[1], self.candidates.shape[0]

    def search(self, query: torch.Tensor | np.ndarray, k: int = 8) -> list[Hit]:
        """The k rows nearest to a (D,) query, best first."""
        query = torch.as_tensor(np.asarray(query, dtype=np.float32)).flatten()
        if query.shape[0] != self.dim:
            raise UserError(f"The model gives {query.shape[0]}-d embeddings but {self.path} holds {self.dim}-d "
                            "ones: pass the --checkpoint they were made with.")
        if self.searcher is not None:
            from multimodal.eval.parts import describe

            scores, rows = self.searcher.search(query.numpy()[None], k)
            found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
            metas = describe(self.searcher.parts, [r for r, _ in found])
            return [Hit(row, score, meta) for (row, score), meta in zip(found, metas)]
        hits = top_k(self.candidates, query, k)
        rows = self.emb.image_rows if self.target == "images" else self.emb.text_rows
        captions = first_captions(self.emb) if self.target == "images" else {}
        return [Hit(row, score, {**({"caption": captions[row]} if row in captions else {}), **rows[row]})
                for row, score in hits]


def check_query_model(info: dict, where: Path, checkpoint: Path | None, model: str | None,
                      pretrained: str | None) -> None:
    """Refuse, in one sentence, a query model other than the one whose embeddings `where` holds (its info.json's
    model, checkpoint, pretrained): its vectors would be compared with another model's, a meaningless score."""
    given = {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None, "model": model,
             "pretrained": pretrained}
    differs = [f"--{name} {value}" for name, value in given.items()
               if value is not None and value != info.get(name)]
    if differs:
        theirs = ", ".join(f"{name} {info[name]}" for name in ("model", "pretrained", "checkpoint") if info.get(name))
        raise UserError(f"{where} holds embeddings of {theirs}, not of {' '.join(differs)}: a query is compared only "
                        "with the same model's embeddings, so leave out the weights options (the index's own model "
                        "is used) or index that model's embeddings.")


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
