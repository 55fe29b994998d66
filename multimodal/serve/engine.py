"""The searching half of `multimodal serve`: a model and the rows it searches (`Target`s opened through
`eval.search.Collection`), and `Engine.run`, which answers a batch of queries at once: the texts encoded as one
batch, the images as another, every query vector searched in one matrix product (an embedding folder: exact
cosine scores of every row) or one faiss call (an index folder: its candidates re-ranked from its float16 vectors).

`Collection.search` takes one query; a batch of them here scores an embedding folder's rows, made unit length
once at start-up, as a (B, D) x (D, N) product, and names an index's rows from its parts' JSONL files read once
and kept (`eval.parts.describe` reads a part's file at every call). From COARSE_FROM rows, on a CPU that scores
bfloat16 faster, the product reads a bfloat16 copy first and re-scores a shortlist in float32, with a bound
that makes the result the exact top k (`exact_top_k`): half the bytes read a query batch.
"""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multimodal.data.pixels import EvalTransform
from multimodal.errors import UserError
from multimodal.eval.search import Collection, first_captions

TARGETS = ("images", "texts")
PART_CACHE = 64  # an index's parts whose rows are kept in memory at a time
COARSE_FROM = 20_000  # rows from which an exact search shortlists through bfloat16 scores first (`exact_top_k`)
COARSE_ERROR = 0.025  # the most a bfloat16 score of unit vectors differs from the float32 one, with a margin
SHORTLIST = 64  # rows beyond k that a query's bfloat16 scores shortlist for float32 scoring


@dataclass
class Query:
    kind: str  # "text", "image" or "row"
    value: object  # the text, the decoded image (PIL or (H, W, 3) uint8), or the row of `target`
    target: str  # "images" or "texts": what is searched
    k: int


@dataclass
class Found:
    row: int
    score: float
    meta: dict  # key, caption, file_name or url of the row, as `embed` recorded it


class Target:
    """The rows of one kind (images or texts) of an embedding folder or an index, searched a batch at a time."""

    def __init__(self, collection: Collection):
        self.collection, self.target, self.dim = collection, collection.target, collection.dim
        self.count = collection.count
        self.exact = collection.searcher is None
        if self.exact:
            self.unit = F.normalize(collection.candidates.float(), dim=-1)  # (N, D), once
            self.coarse = coarse_copy(self.unit)  # (N, D) bfloat16, or None
            emb = collection.emb
            self.rows = emb.image_rows if self.target == "images" else emb.text_rows
            self.captions = first_captions(emb) if self.target == "images" else {}
        else:
            self.parts = collection.searcher.parts
            self._part_rows: OrderedDict[int, tuple[list[dict], dict[int, str]]] = OrderedDict()
            self._lock = threading.Lock()  # the engine's thread and the thumbnails' threads read rows

    @property
    def how(self) -> str:
        if self.exact:
            return "exact" if self.coarse is None else "exact (bfloat16 shortlist)"
        return f"faiss {self.collection.info['factory']}"

    def vectors(self, rows: list[int]) -> torch.Tensor:
        """(len(rows), D) float32 unit vectors of `rows`."""
        if self.exact:
            return self.unit[rows]
        return F.normalize(torch.from_numpy(self.parts.take(np.asarray(rows, dtype=np.int64))), dim=-1)

    def search(self, queries: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        """The k best (row, cosine score) of each of (B, D) `queries`, best first."""
        if self.exact:
            queries = F.normalize(queries.float(), dim=-1)
            if self.coarse is not None and self.count > k + SHORTLIST:
                return exact_top_k(queries, self.unit, self.coarse, k)
            values, rows = (queries @ self.unit.T).topk(min(k, self.count), dim=1)  # (B, N) scores
            return [list(zip(r, v)) for r, v in zip(rows.tolist(), values.tolist())]
        scores, rows = self.collection.searcher.search(queries.float().numpy(), k)
        return [[(int(r), float(s)) for r, s in zip(rs, ss) if r >= 0] for rs, ss in zip(rows, scores)]

    def meta(self, row: int) -> dict:
        """What `embed` recorded of `row` (key, file_name or url, caption: an image's first caption)."""
        if self.exact:
            found = self.rows[row]
            return {"caption": self.captions[row], **found} if row in self.captions else found
        from multimodal.eval.parts import row_of

        part, local = self.parts.locate(row)
        return row_of(*self._rows_of(part), local)

    def _rows_of(self, part: int) -> tuple[list[dict], dict[int, str]]:
        """An index part's rows and its images' first captions (`eval.parts.part_rows`), the last PART_CACHE kept."""
        with self._lock:
            if part in self._part_rows:
                self._part_rows.move_to_end(part)
                return self._part_rows[part]
        from multimodal.eval.parts import part_rows

        lines, captions = part_rows(self.parts, part)
        with self._lock:
            self._part_rows[part] = lines, captions
            if len(self._part_rows) > PART_CACHE:
                self._part_rows.popitem(last=False)
        return lines, captions

    def all_metas(self):
        """Every row's record, in order (for the start-up check of where the images are)."""
        if self.exact:
            yield from self.rows
            return
        from multimodal.eval.parts import jsonl_rows

        for i in range(len(self.parts.names)):
            yield from jsonl_rows(self.parts.index_path(i))


def coarse_copy(unit: torch.Tensor) -> torch.Tensor | None:
    """A bfloat16 copy of (N, D) unit rows where scoring with it is at least 1.5x faster than float32 on this CPU
    (half the bytes to read: CPUs with AVX512-BF16 or AMX), and its scores stay within COARSE_ERROR of the
    float32 ones on a sample; else None. Only worth it for large sets: None below COARSE_FROM rows."""
    if unit.shape[0] < COARSE_FROM:
        return None
    coarse = unit.to(torch.bfloat16)
    sample = unit[:COARSE_FROM]
    probe = sample[torch.arange(8) * (COARSE_FROM // 8)]  # rows of the set: scores up to 1, where rounding is largest

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        return time.perf_counter() - start

    fast = timed(lambda: probe.to(torch.bfloat16) @ coarse[:COARSE_FROM].T)
    slow = timed(lambda: probe @ sample.T)
    error = ((probe.to(torch.bfloat16) @ coarse[:COARSE_FROM].T).float() - probe @ sample.T).abs().max().item()
    return coarse if fast * 1.5 < slow and error < COARSE_ERROR / 2 else None


def exact_top_k(queries: torch.Tensor, unit: torch.Tensor, coarse: torch.Tensor, k: int
                ) -> list[list[tuple[int, float]]]:
    """The exact top k (float32 cosine scores) of (B, D) unit `queries` among (N, D) `unit` rows, found through
    their bfloat16 copy `coarse`: its scores shortlist k + SHORTLIST rows, re-scored in float32. A bfloat16
    score is within COARSE_ERROR of the float32 one (each factor rounded by at most 2^-8 of itself, the sum of
    |q_i c_i| at most 1 for unit vectors, the result rounded once more: 0.012, doubled), so a row left off the
    shortlist scores at most its last coarse score + COARSE_ERROR; where that is below the k-th exact score of
    the shortlist, the shortlist's top k is the exact top k. Where it is not (near ties), the query is scored
    against every float32 row."""
    values, rows, unsure = shortlist_top_k(queries, unit, coarse, k)
    if unsure:
        values[unsure], rows[unsure] = (queries[unsure] @ unit.T).topk(k, dim=1)
    return [list(zip(r, v)) for r, v in zip(rows.tolist(), values.tolist())]


def shortlist_top_k(queries: torch.Tensor, unit: torch.Tensor, coarse: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(values, rows), each (B, k), of `exact_top_k`'s shortlist, and the queries whose shortlist the bound
    leaves unsure (the exact top k only where a query is not among them)."""
    approx = (queries.to(torch.bfloat16) @ coarse.T).float()  # (B, N)
    approx_scores, shortlist = approx.topk(k + SHORTLIST, dim=1)  # (B, S)
    exact = torch.einsum("bd,bsd->bs", queries, unit[shortlist])  # (B, S) float32
    values, order = exact.topk(k, dim=1)
    unsure = (approx_scores[:, -1] + COARSE_ERROR >= values[:, -1]).nonzero().flatten().tolist()
    return values, torch.gather(shortlist, 1, order), unsure


def open_targets(index: Path) -> dict[str, Target]:
    """The searchable kinds of an embedding folder (its images, its texts: those it has) or of an index (its one
    kind), each a `Target`."""
    from multimodal.eval.index import is_index

    if is_index(index):
        collection = Collection(index)
        return {collection.target: Target(collection)}
    first = Collection(index, setting="--{}")
    found = {first.target: Target(first)}
    other = "texts" if first.target == "images" else "images"
    if (first.emb.text_features if other == "texts" else first.emb.image_features).shape[0]:
        found[other] = Target(Collection(index, other, setting="--{}", emb=first.emb))  # the folder read once
    return found


class Engine:
    """A model and the targets it searches; `run` answers a batch of queries (called from one thread)."""

    def __init__(self, model, targets: dict[str, Target], index: Path):
        self.model = model.eval()
        self.targets, self.index = targets, index
        self.tokenizer = model.architecture.tokenizer
        self.transform = EvalTransform.of(model.architecture.preprocessing)
        self.batches = self.queries = 0  # how many batches `run` encoded, and how many queries they held
        dim = model.architecture.embed_dim
        for target in targets.values():
            if target.dim != dim:
                raise UserError(f"The model gives {dim}-d embeddings but {index} holds {target.dim}-d ones: serve "
                                "it with the model that made it (leave out --checkpoint and --model).")
        self.info = next(iter(targets.values())).collection.info

    @property
    def default_target(self) -> str:
        return "images" if "images" in self.targets else "texts"

    @torch.no_grad()
    def run(self, queries: list[Query]) -> list[list[Found]]:
        """The hits of each query, best first: texts encoded in one batch, images in another, all searched
        together by target and the largest k asked of it."""
        vectors: list[torch.Tensor | None] = [None] * len(queries)
        for kind, encode in (("text", self._texts), ("image", self._images)):
            chosen = [i for i, q in enumerate(queries) if q.kind == kind]
            if chosen:
                for i, vector in zip(chosen, encode([queries[i].value for i in chosen])):
                    vectors[i] = vector
        for i, q in enumerate(queries):
            if q.kind == "row":
                vectors[i] = self.targets[q.target].vectors([q.value])[0]
        out: list[list[Found]] = [[] for _ in queries]
        for name, target in self.targets.items():
            chosen = [i for i, q in enumerate(queries) if q.target == name]
            if not chosen:
                continue
            k = max(queries[i].k for i in chosen)
            hits = target.search(torch.stack([vectors[i] for i in chosen]), k)
            for i, found in zip(chosen, hits):
                out[i] = [Found(row, score, target.meta(row)) for row, score in found[:queries[i].k]]
        self.batches, self.queries = self.batches + 1, self.queries + len(queries)
        return out

    def _texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts)).float()

    def _images(self, images: list) -> torch.Tensor:
        pixels = torch.stack([self.transform(image) for image in images])  # (B, 3, H, W), normalised
        return self.model.encode_image(pixels).float()
