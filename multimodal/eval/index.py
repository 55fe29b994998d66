"""Approximate nearest-neighbour indexes (faiss) over an embedding folder: chosen, built part by part, merged,
searched with a re-ranking stage.

An index folder (`multimodal index EMB_DIR --out INDEX`):

    info.json      the model (as the embedding folder's info.json names it), dim, kind, the faiss factory string,
                   nprobe, efSearch and the candidates re-ranked, count, recall@10 measured at build time, the
                   parts it holds
    index.faiss    the faiss index, in memory when searched (what --max_index_memory bounds)
    vectors.faiss  IVF-PQ only: the re-ranking stage, the vectors in float16 (`eval/vectors.py`), on disk and
                   memory-mapped when searched

The index is chosen as autofaiss chooses (https://github.com/criteo/autofaiss, `get_optimal_index_keys_v2`,
after faiss's guidelines, https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index):
exact (`IDMap,Flat`, inner product) below EXACT_BELOW vectors where it fits the memory budget; above, or where
it does not fit, IVF with a product quantiser whose lists (~4 sqrt(n)) and code size (the longest of dim/4 ..
dim/32 4-bit codes that fits) follow from the count, the dimension and the budget. The coarse quantiser is an
HNSW graph, as autofaiss's, where the lists' centroids are many (nlist x dim above FLAT_COARSE_MAX); below, the
centroids are searched exactly, a matrix product that is faster for a batch of queries (measured: 2.5x at
4,096 lists of 512-d on 2 cores) and finds every query's nearest lists. The codes are faiss's fast-scan PQ
(4 bits a sub-vector, scanned 32 at a time in SIMD registers), of the vectors themselves rather than their
residuals (one lookup table a query, not one a list): ~10x the queries/s of 8-bit codes of the same size, their
coarser distances made good by the re-ranking stage: faiss's `IndexRefine` takes `rerank` candidates from the
IVF-PQ stage and re-scores them from the float16 vectors, memory-mapped, in C++ (6x the numpy re-scoring of
the parts it replaced). The scores returned are the cosines of the query with the stored vectors. Vectors are
unit length, so both stages rank by L2 distance, which orders them as cosine does.

Row ids inside an index are positions among the rows it holds (its parts, in order); a search returns rows of
the whole embedding folder, which name its index entries. Index pieces of disjoint --parts merge as faiss
merges (`merge_from`, the ids moved past the rows before them) and their vectors files are joined in order.
"""

import hashlib
import math
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from multimodal.errors import UserError
from multimodal.eval import vectors
from multimodal.eval.parts import KINDS, Parts, unit
from multimodal.files import atomic_folder, write_json
from multimodal.userfiles import read_json, reading

EXACT_BELOW = 50_000  # vectors: an exact index below this where it fits (2.5 ms a query at 512-d on one core)
TARGET_RECALL = 0.95  # nprobe is the smallest that reaches this recall@10 at build time
RERANK = 100  # candidates re-ranked from the float16 vectors a query (at least k), with codes of dim/4 bytes
MAX_RERANK = 1000  # where the codes rank too coarsely for RERANK (tune)
HNSW_M = 32  # links per node of the coarse quantiser's graph
FLAT_COARSE_MAX = 1 << 22  # nlist x dim at most this: the centroids searched exactly (~4M multiply-adds a query)
RECALL_QUERIES = 1000
MIN_PER_LIST = 39  # training vectors per list that faiss's k-means asks for
SEED = 1234
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str, option: str = "--max_index_memory") -> int:
    """Bytes of a memory size as autofaiss reads one ("4GB", "512M", "1.5G": powers of 1024)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(B?)\s*", text, re.IGNORECASE)
    if found is None or float(found.group(1)) <= 0:
        raise UserError(f"{option} must be a size such as 4GB, 512MB or 1.5G, got {text!r}.")
    return int(float(found.group(1)) * UNITS[found.group(2).upper()])


def human(size: float) -> str:
    for name in ("B", "KB", "MB", "GB"):
        if size < 1024 or name == "GB":
            return f"{size:.0f} {name}" if name == "B" else f"{size:.1f} {name}"
        size /= 1024
    return ""


@dataclass(frozen=True)
class Plan:
    """The index a count and a budget get: exact (nlist 0) or IVF-PQ with m 4-bit codes a vector."""
    dim: int
    nlist: int = 0
    m: int = 0

    @property
    def hnsw(self) -> bool:
        """Whether the coarse quantiser is an HNSW graph (many centroids) rather than exact."""
        return self.nlist * self.dim > FLAT_COARSE_MAX

    @property
    def factory(self) -> str:
        if not self.nlist:
            return "IDMap,Flat"
        return f"IVF{self.nlist}{f'_HNSW{HNSW_M}' if self.hnsw else ''},PQ{self.m}x4fs"

    @property
    def rerank(self) -> int:
        """Candidates re-ranked a query: RERANK with dim/4 codes, more with coarser ones."""
        return 0 if not self.nlist else min(RERANK * max(1, self.dim // 4 // self.m), MAX_RERANK)

    def bytes(self, count: int) -> int:
        """What the index holds in memory once loaded (its serialised size, a little above)."""
        if not self.nlist:
            return count * (self.dim * 4 + 8)
        code = self.m // 2  # 4 bits a sub-vector
        lists = count * (code + 8) + self.nlist * (32 * code + 56)  # codes in blocks of 32, ids; the last block
        quantiser = self.nlist * (self.dim * 4 + (2 * HNSW_M * 4 + 40 if self.hnsw else 0))  # + level-0 links,
        return lists + quantiser + self.dim * 16 * 4  # upper levels; the code books

    def disk(self, count: int) -> int:
        """What the re-ranking stage's vectors file takes on disk (memory-mapped when searched)."""
        return count * self.dim * 2 if self.nlist else 0


def lists_for(count: int) -> int:
    """~4 sqrt(count), a power of two, with MIN_PER_LIST training vectors a list."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
    while nlist > 1 and nlist * MIN_PER_LIST > count:
        nlist //= 2
    return nlist


def choose(count: int, dim: int, budget: int) -> Plan:
    """The index for `count` vectors of `dim` within `budget` bytes, or one sentence when none fits."""
    exact = Plan(dim)
    if count < EXACT_BELOW and exact.bytes(count) <= budget:
        return exact
    codes = [m for m in dict.fromkeys((dim // 4, dim // 8, dim // 16, dim // 32)) if m >= 2 and m % 2 == 0
             and dim % m == 0]
    smallest = exact.bytes(count)
    if count >= 16 * MIN_PER_LIST and codes:  # 16 centroids a sub-quantiser, each on enough vectors
        for m in codes:
            plan = Plan(dim, lists_for(count), m)
            if plan.bytes(count) <= budget:
                return plan
        smallest = min(smallest, plan.bytes(count))
    raise UserError(f"The smallest index of {count:,} {dim}-d vectors takes {human(smallest)}, more than "
                    f"--max_index_memory {human(budget)}: give it at least {math.ceil(smallest / (1 << 20))}MB.")


class Searcher:
    """A faiss index, its re-ranking vectors (IVF-PQ; None for an exact index) and the parts it names rows of:
    `search` gives the cosine scores of the best rows of the embedding folder, best first."""

    def __init__(self, index, parts: Parts, held: list[list[int]], stored=None, rerank: int = 0):
        self.base, self.stored, self.parts, self.rerank = index, stored, parts, rerank
        self.exact = stored is None
        self.index = index if self.exact else faiss.IndexRefine(index, stored)
        quantizer = None if self.exact else faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        self.hnsw = isinstance(quantizer, faiss.IndexHNSW)
        starts = np.array([parts.offsets[a] for a, _ in held], np.int64)  # rows of the folder that held ranges
        sizes = np.array([parts.offsets[b] - parts.offsets[a] for a, b in held], np.int64)  # begin at, in order
        self._positions = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._shift = starts - self._positions

    def set(self, nprobe: int, ef_search: int) -> None:
        if not self.exact:
            space = faiss.ParameterSpace()
            space.set_index_parameter(self.base, "nprobe", nprobe)
            if self.hnsw:
                space.set_index_parameter(self.base, "quantizer_efSearch", ef_search)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The folder's rows of positions in the index (-1 stays -1)."""
        segment = np.searchsorted(self._positions, positions, side="right") - 1
        return np.where(positions >= 0, positions + self._shift[np.maximum(segment, 0)], -1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), best first, of (B, D) `queries` (made unit length here); rows -1 and scores
        -inf where fewer than k are found."""
        queries = unit(queries)
        if self.exact:
            scores, positions = self.index.search(queries, k)
            return scores, self.rows(positions)
        params = faiss.IndexRefineSearchParameters(k_factor=max(self.rerank / k, 1.0))
        positions = self.index.search(queries, k, params=params)[1]
        found = positions >= 0
        stored = self.stored.reconstruct_batch(np.where(found, positions, 0).ravel()).reshape(*positions.shape, -1)
        norms = np.maximum(np.linalg.norm(stored, axis=-1), 1e-12)
        scores = np.where(found, np.einsum("bkd,bd->bk", stored, queries) / norms, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")  # ranked by L2 distance; the cosines may swap near-ties
        return np.take_along_axis(scores, order, 1), self.rows(np.take_along_axis(positions, order, 1))


def ef_search_for(nprobe: int) -> int:
    return max(2 * nprobe, 16)  # autofaiss's choice: the quantiser's graph explores twice the lists probed


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max((t >= 0).sum(), 1) for f, t in zip(found, truth)]
    return float(np.mean(hits))


def tune(searcher: Searcher, nlist: int, queries: np.ndarray, truth: np.ndarray) -> tuple[int, float]:
    """(nprobe, recall@10): the smallest nprobe (doubling, then halving the gap) whose recall@10 against `truth`
    reaches TARGET_RECALL, or every list's where none does. Where probing every list falls short, the searcher
    re-ranks more candidates first (doubling `rerank` up to MAX_RERANK)."""
    if searcher.exact:
        return 0, recall_at_10(searcher.search(queries, 10)[1], truth)
    measured: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in measured:
            searcher.set(nprobe, ef_search_for(nprobe))
            measured[nprobe] = recall_at_10(searcher.search(queries, 10)[1], truth)
        return measured[nprobe]

    while recall(nlist) < TARGET_RECALL and searcher.rerank < MAX_RERANK:
        searcher.rerank = min(2 * searcher.rerank, MAX_RERANK)
        measured.clear()
    low, high = 0, 1
    while recall(high) < TARGET_RECALL and high < nlist:
        low, high = high, min(2 * high, nlist)
    while high - low > max(1, high // 8):
        middle = (low + high) // 2
        low, high = (low, middle) if recall(middle) >= TARGET_RECALL else (middle, high)
    searcher.set(high, ef_search_for(high))
    return high, measured[high]


def exact_neighbours(parts: Parts, held: list[range], queries: np.ndarray, k: int = 10) -> np.ndarray:
    """(B, k) rows of the exact k nearest (inner product) of unit `queries` among the parts `held`."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for part_range in held:
        for first, x in parts.chunks(part_range):
            scores, rows = faiss.knn(queries, unit(x), min(k, len(x)), metric=faiss.METRIC_INNER_PRODUCT)
            if rows.shape[1] < k:
                pad = ((0, 0), (0, k - rows.shape[1]))
                scores, rows = np.pad(scores, pad, constant_values=-np.inf), np.pad(rows, pad, constant_values=-1)
            heap.add_result(scores, np.where(rows >= 0, rows + first, -1))
    heap.finalize()
    return heap.I


def recall_queries(folder: Path, kind: str, parts: Parts) -> tuple[np.ndarray, str]:
    """Held-out queries for recall@10: the other kind's embeddings where the folder has them (text queries for an
    image index, as people search), else RECALL_QUERIES of the vectors, perturbed (cosine ~0.9 to their own)."""
    other = "text" if kind == "image" else "image"
    if any((folder / f"{KINDS[other]}_index").glob("part-*.jsonl")):
        theirs = Parts(folder, other)
        if theirs.count >= 100 and theirs.dim == parts.dim:
            rows = np.linspace(0, theirs.count - 1, min(RECALL_QUERIES, theirs.count)).astype(np.int64)
            return unit(theirs.take(np.unique(rows))), f"{len(np.unique(rows))} {other} embeddings"
    rng = np.random.default_rng(SEED)
    rows = np.sort(rng.choice(parts.count, min(RECALL_QUERIES, parts.count), replace=False))
    noise = rng.standard_normal((len(rows), parts.dim)).astype(np.float32) * (0.5 / math.sqrt(parts.dim))
    return unit(parts.take(rows) + noise), f"{len(rows)} of its vectors, perturbed"


def new_index(plan: Plan):
    """An empty index of `plan`: inner product when exact; L2 (the same order on unit vectors) for IVF-PQ, whose
    codes are of the vectors themselves, not of their residuals (one lookup table a query, not one a list)."""
    if not plan.nlist:
        return faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    ivf.by_residual = False
    ivf.cp.niter = 10
    if faiss.get_num_gpus() > 0:  # faiss-gpu: k-means' assignments on the GPUs
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(plan.dim))
    return index


def training_size(plan: Plan, count: int) -> int:
    """Vectors k-means and the code books train on: 50 a list (faiss warns below 39), at least 65,536."""
    return min(count, max(50 * plan.nlist, 1 << 16))


def train(index, plan: Plan, parts: Parts) -> str:
    """Train `index` on a sample drawn from every part (the same for any --parts: shards train alike); the digest
    of the trained, empty index, which shards must share to be merged."""
    if plan.nlist:
        rng = np.random.default_rng(SEED)
        size = training_size(plan, parts.count)
        index.train(parts.take(np.sort(rng.choice(parts.count, size, replace=False))))
    return hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest()[:16]


INDEX_FILE, INFO_FILE, VECTORS_FILE = "index.faiss", "info.json", "vectors.faiss"
LAYOUT = 2  # info.json's "layout": 2, ids are positions among the rows held and IVF-PQ has vectors.faiss
READ_FLAGS = faiss.IO_FLAG_MMAP  # mapped where the index type allows


def embedding_info(folder: Path) -> dict:
    """The embedding folder's info.json (which model made it)."""
    from multimodal.eval.embed import read_info  # here: it brings torch, which building an index does not need

    return read_info(folder)


def build_index(embeddings: Path, out: Path, budget: int, kind: str | None = None,
                parts: tuple[int | None, int | None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Index the `kind` ("image" or "text"; default: images where the folder has them) embeddings of the folder
    (of its parts[0]:parts[1] only, numbered as in the whole folder, for merging) within `budget` bytes, written
    to the new folder `out` at once; returns its info."""
    model = embedding_info(embeddings)
    kind = kind or ("image" if any((embeddings / "img_index").glob("part-*.jsonl")) else "text")
    source = Parts(embeddings, kind)
    if source.count == 0:
        raise UserError(f"Embedding folder {embeddings} holds no {kind} embeddings to index: embed some with "
                        "`multimodal embed`, or choose the other --kind.")
    held = range(len(source.names))[slice(*(parts or (None, None)))]
    if not len(held):
        raise UserError(f"--parts {parts[0]}:{parts[1]} holds none of the {len(source.names)} parts of "
                        f"{embeddings}: give a range within 0:{len(source.names)}.")
    plan = choose(source.count, source.dim, budget)
    count = int(source.offsets[held.stop] - source.offsets[held.start])
    stage = f" and {human(plan.disk(source.count))} of float16 vectors on disk" if plan.nlist else ""
    log(f"Indexing {count:,} {kind} embeddings ({source.dim}-d, parts {held.start}:{held.stop} of "
        f"{len(source.names)}) as {plan.factory} (~{human(plan.bytes(source.count))} in memory{stage} for all "
        f"{source.count:,}; --max_index_memory {human(budget)}).")
    index = new_index(plan)
    if plan.nlist:
        log(f"Training {plan.nlist:,} lists and the codes on {training_size(plan, source.count):,} "
            "vectors drawn from every part...")
    trained = train(index, plan, source)
    info = {"model": model["model"], "checkpoint": model.get("checkpoint"),
            **({"pretrained": model["pretrained"]} if model.get("pretrained") else {}),
            "embeddings": str(embeddings.resolve()), "kind": kind, "dim": source.dim, "factory": plan.factory,
            "trained": trained, "count": count,
            "parts": {"names": source.names, "rows": source.rows}, "held": [[held.start, held.stop]],
            "rerank": plan.rerank, "layout": LAYOUT}

    def fill(partial: Path) -> tuple:
        stage = vectors.writing(partial / VECTORS_FILE, source.dim, count) if plan.nlist else nullcontext()
        with stage as write, tqdm(total=count, unit="vec", unit_scale=True, desc="adding", mininterval=1.0) as bar:
            for first, x in source.chunks(held):
                position = first - int(source.offsets[held.start])
                index.add_with_ids(unit(x), np.arange(position, position + len(x), dtype=np.int64))
                if write is not None:
                    write(x)
                bar.update(len(x))
        return index, _measure(index, source, info, partial)

    return _write(out, fill, log)


def _measure(index, source: Parts, info: dict, folder: Path) -> dict:
    """`info` with the nprobe chosen and the recall@10 measured against exact search on held-out queries (the
    index's re-ranking vectors read from `folder`)."""
    searcher = Searcher(index, source, info["held"], read_stored(folder, info), info["rerank"])
    queries, about = recall_queries(source.folder, info["kind"], source)
    truth = exact_neighbours(source, [range(a, b) for a, b in info["held"]], queries)
    nlist = faiss.extract_index_ivf(index).nlist if info["rerank"] else 0
    nprobe, recall = tune(searcher, nlist, queries, truth)
    return {**info, "nprobe": nprobe, "efSearch": ef_search_for(nprobe) if searcher.hnsw else 0,
            "rerank": searcher.rerank, "recall@10": round(recall, 4), "recall_queries": about}


def _write(out: Path, fill: Callable[[Path], tuple], log: Callable[[str], None]) -> dict:
    """The index folder `out`, written at once: `fill(partial folder)` gives (index, info), written into it with
    whatever `fill` wrote there, and the folder renamed to `out`; nothing is left where any step fails."""
    try:
        with atomic_folder(out) as partial:
            index, info = fill(partial)
            try:
                faiss.write_index(index, str(partial / INDEX_FILE))
            except RuntimeError as exc:  # faiss's own failed writes (a full disk)
                raise OSError(str(exc).strip().splitlines()[-1][:160]) from None
            write_json(partial / INFO_FILE, info)
    except FileExistsError:
        raise UserError(f"--out {out} exists: choose a new folder, or delete it first.") from None
    except OSError as exc:
        raise UserError(f"{out} cannot be written ({exc.strerror or exc}): choose a writable folder with room "
                        "for it.") from None
    recall = info["recall@10"]
    probe = (f" at nprobe {info['nprobe']}{f', efSearch {ef}' if (ef := info['efSearch']) else ''}, "
             f"{info['rerank']} candidates re-ranked" if info["rerank"] else "")
    log(f"Wrote {out}: {info['count']:,} vectors, {info['factory']}; recall@10 {recall:.3f} against exact search "
        f"({info['recall_queries']}){probe}.")
    if recall < TARGET_RECALL:
        log(f"recall@10 stays under {TARGET_RECALL} even probing every list and re-scoring {info['rerank']} "
            "candidates: the product quantiser is too coarse for these vectors; a larger --max_index_memory gives "
            "it longer codes.")
    return info


def is_index(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file()


def read_index_info(folder: Path) -> dict:
    """An index folder's info.json, checked for the fields a search and a merge read."""
    info = read_json(folder / INFO_FILE, "build the index again with `multimodal index`")
    needed = {"model": str, "embeddings": str, "kind": str, "dim": int, "factory": str, "count": int,
              "nprobe": int, "efSearch": int, "rerank": int, "trained": str, "held": list, "parts": dict}
    wrong = [k for k, t in needed.items() if not isinstance(info, dict) or not isinstance(info.get(k), t)]
    if wrong:
        raise UserError(f"{folder / INFO_FILE} lacks {', '.join(wrong)} or has them of another type: build the "
                        "index again with `multimodal index`.")
    if info.get("layout") != LAYOUT:
        raise UserError(f"Index {folder} was built by an earlier version of multimodal, whose index folders this "
                        "one does not read: build the index again with `multimodal index`.")
    return info


def source_parts(info: dict, folder: Path) -> Parts:
    """The embedding parts an index names its rows by (their index entries), as they were when it was built."""
    embeddings = Path(info["embeddings"])
    if not embeddings.is_dir():
        raise UserError(f"Index {folder} names its rows from the embedding folder {embeddings}, which is gone: put it "
                        "back, or build the index again from where it is now.")
    parts = Parts(embeddings, info["kind"], info["parts"]["names"], info["parts"]["rows"])
    parts.dim = info["dim"]
    return parts


def read_faiss(path: Path, flags: int = READ_FLAGS):
    with reading(path, "build the index again with `multimodal index`"):
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:  # faiss's own, naming its C++ functions: a file cut short, not an index
            raise ValueError("faiss finds it cut short or not an index") from None


def read_stored(folder: Path, info: dict):
    """An IVF-PQ index folder's re-ranking vectors (`vectors.faiss`, memory-mapped); None for an exact index."""
    return read_faiss(folder / VECTORS_FILE, vectors.READ_FLAGS) if info["rerank"] else None


def open_index(folder: Path) -> tuple[Searcher, dict]:
    """(searcher, info) of an index folder: the index memory-mapped, set to its nprobe and efSearch."""
    info = read_index_info(folder)
    searcher = Searcher(read_faiss(folder / INDEX_FILE), source_parts(info, folder), info["held"],
                        read_stored(folder, info), info["rerank"])
    searcher.set(info["nprobe"], info["efSearch"])
    return searcher, info


def merge_indexes(inputs: list[Path], out: Path, log: Callable[[str], None] = print) -> dict:
    """One index of the index folders `inputs`, built from disjoint --parts of one embedding folder with the same
    training (any order): their lists joined by faiss (`Index.merge_from`) in part order, so that it searches as
    one build of those parts. The merged index is built in memory: it takes what its budget allowed."""
    infos = sorted(((read_index_info(p), p) for p in inputs), key=lambda pair: pair[0]["held"][0][0])
    first, path = infos[0]
    for info, other in infos[1:]:
        differs = [k for k in ("embeddings", "model", "kind", "dim", "factory", "trained", "parts")
                   if info[k] != first[k]]
        if differs:
            raise UserError(f"{other} and {path} differ in {', '.join(differs)}: merge only indexes built from one "
                            "embedding folder with the same settings (`multimodal index --parts`).")
    held = sorted(tuple(r) for info, _ in infos for r in info["held"])
    overlap = [f"{a[0]}:{a[1]} and {b[0]}:{b[1]}" for a, b in zip(held, held[1:]) if b[0] < a[1]]
    if overlap:
        raise UserError(f"The indexes to merge hold the same parts twice ({overlap[0]}): merge indexes of "
                        "disjoint --parts.")
    log(f"Merging {len(infos)} indexes of parts {', '.join(f'{a}:{b}' for a, b in held)} of {first['embeddings']}.")
    source = source_parts(first, path)
    info = {**first, "count": sum(i["count"] for i, _ in infos), "held": _joined(held)}

    def fill(partial: Path) -> tuple:
        merged = read_faiss(path / INDEX_FILE, 0)  # read whole: it grows by the others'
        for _, other in infos[1:]:  # one at a time: the merged index and one piece in memory at most
            merged.merge_from(read_faiss(other / INDEX_FILE), merged.ntotal)  # its positions follow ours
        if first["rerank"]:
            vectors.concatenate([p / VECTORS_FILE for _, p in infos], partial / VECTORS_FILE, first["dim"])
        return merged, _measure(merged, source, info, partial)

    return _write(out, fill, log)


def _joined(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """Sorted part ranges with touching ones joined: [(0, 3), (3, 5), (7, 9)] -> [[0, 5], [7, 9]]."""
    out: list[list[int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return out
