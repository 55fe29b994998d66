"""Bad data, by kind: what the pipeline skips, counts and reports instead of failing on.

A web-scale shard set always holds some broken samples and, over a long run, a shard that is cut
off or gone. Each is skipped and counted under one of these kinds; the counts travel with the
batches (`TrainBatch.bad`) to the training module, which logs them, stops the run when too large a
fraction of samples is bad, and reports the totals at the end.
"""

import logging
import re
import tarfile
from collections import Counter

log = logging.getLogger("multimodal.data")

SAMPLE_KINDS = (
    "no image",  # no jpg/jpeg/png/webp member
    "empty image",  # a zero-byte image member
    "not an image",  # bytes no image decoder recognises
    "truncated image",  # an image whose data ends early
    "corrupt image",  # an image a decoder recognises but cannot decode
    "oversized image",  # more pixels than data.max_image_pixels (a decompression bomb), refused unread
    "no caption",  # no json/txt member
    "empty caption",  # captions that are empty or only whitespace
    "unreadable caption",  # a json member that does not parse, or text that is not UTF-8
)
SHARD_KINDS = (
    "missing shard",  # a URL or file that cannot be opened
    "truncated shard",  # a tar that ends in the middle of a member
    "unreadable shard",  # any other failure reading a tar
)
SHOWN_PER_KIND = 3  # warnings per kind and worker; later ones are only counted


class BadSample(Exception):
    """A sample that cannot be trained on; `kind` is one of SAMPLE_KINDS."""

    def __init__(self, kind: str):
        assert kind in SAMPLE_KINDS, kind
        super().__init__(kind)
        self.kind = kind


def shard_fault_kind(exc: BaseException) -> str:
    """The SHARD_KINDS entry of an exception raised while opening or reading a tar shard."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, FileNotFoundError) or re.search(r"\bexit \d+", text) or any(
            s in text for s in ("no such file", "not found", "empty file", "exit status", "could not resolve")):
        # nothing came: a local file that is gone, a URL that answers 404 (curl's "exit 22"), a
        # pipe: command that failed; webdataset reports the last as an empty file or an exit status
        return "missing shard"
    if isinstance(exc, (tarfile.ReadError, EOFError)) or any(s in text for s in ("unexpected end", "truncated")):
        return "truncated shard"
    return "unreadable shard"


class FaultCounter:
    """One worker's bad samples and shard faults since the last batch, with a few warnings shown.

    `take()` hands the counts over (into the next batch) and starts afresh; `shown` persists so
    that each kind is described a few times per worker, not once per occurrence.
    """

    def __init__(self, where: str = ""):
        self.where = where
        self.counts: Counter = Counter()
        self.shown: Counter = Counter()

    def add(self, kind: str, url: str | None, key: str | None = None, detail: str = "") -> None:
        self.counts[kind] += 1
        self.shown[kind] += 1
        if self.shown[kind] <= SHOWN_PER_KIND:
            what = f"sample {key} of {url}" if key else f"shard {url}"
            more = "; further ones are counted, not shown" if self.shown[kind] == SHOWN_PER_KIND else ""
            log.warning("skipped %s: %s%s%s%s", what, kind, f" ({detail})" if detail else "",
                        f" [{self.where}]" if self.where else "", more)

    def shard_fault(self, exc: BaseException) -> bool:
        """A shard reader's handler (`tario.tarfile_samples`): count the fault and go on with the next shard.

        Shard faults come with the shard's URL appended to the exception's args. An exception without
        one (webdataset's key grouping: a file name twice in one sample) is not counted here: it leaves
        an incomplete sample, counted as a bad sample."""
        args = getattr(exc, "args", ())
        if len(args) >= 2 and isinstance(args[-1], str):
            detail = getattr(exc, "strerror", None) or str(args[0]).split(" @ ")[0][:200]
            self.add(shard_fault_kind(exc), args[-1], detail=detail)
        return True

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts


def describe(counts: dict[str, int]) -> str:
    """'3 truncated image, 1 missing shard' in the order of the kinds."""
    order = {k: i for i, k in enumerate(SAMPLE_KINDS + SHARD_KINDS)}
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: order.get(kv[0], 99)) if n)


def bad_sample_count(counts: dict[str, int]) -> int:
    return sum(n for k, n in counts.items() if k in SAMPLE_KINDS)
