"""Thumbnails of the indexed images, read only from where `multimodal embed` recorded them: an image file
(`file_name`) or the image member of a sample (`key`) in a tar shard (`url`).

A request names a row, never a path: the row's record gives the file or the shard, and only a file found at
start-up is read. Each is resolved once, at start-up (`os.path.realpath`), its device, inode, size and time kept; a read
opens that resolved path without following a link (O_NOFOLLOW) and refuses a file that is no longer the one
found then, so a link or another file put in its place later is not read. What is read is decoded as an
image under the decoder's size guards and sent as a fresh JPEG, never as the file's own bytes. Shards are read
at the offsets of their members, from a table of their headers built on first use; remote shards (s3://,
pipe:) have no thumbnails.
"""

import io
import logging
import os
import re
import stat
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageOps

from multimodal.data.decode import IMAGE_KEYS, decode_file
from multimodal.data.faults import BadSample
from multimodal.errors import UserError
from multimodal.userfiles import IMAGE_BYTES, limit

log = logging.getLogger("multimodal.serve")

SIDE = 256  # a thumbnail's longer side
CACHED = 1024  # thumbnails kept (about 15 KB each)
SHARD_TABLES = 32  # shards whose member tables are kept
REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # s3://, https://, pipe: (a path such as C:\ is not ours)
WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key and extension of a member name


class Unavailable(Exception):
    """No thumbnail for a row; the message says why, in one sentence."""


class _Found:
    """A local file found at start-up: its resolved path and identity."""

    def __init__(self, path: str, info: os.stat_result):
        self.path, self.identity = path, identity(info)


class Thumbnails:
    """The image sources of `metas` (each row's record, in row order), checked at once: every local file and
    shard they name exists, else one sentence (a moved folder), raised as UserError."""

    def __init__(self, metas, image_key: str | None = None, where: str = "the index"):
        self.image_key = image_key
        self.files: dict[str, _Found] = {}
        self.shards: dict[str, _Found] = {}
        self._tables: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.remote: set[str] = set()  # shards and files elsewhere than on this machine (s3://, pipe:)
        self._lock = threading.Lock()  # requests are answered on several threads
        missing: dict[str, str] = {}  # source -> "shard" or "file"
        for meta in metas:
            shard = isinstance(meta.get("url"), str)
            source, table = (meta["url"], self.shards) if shard else (meta.get("file_name"), self.files)
            if not isinstance(source, str) or source in table or source in missing or source in self.remote:
                continue
            if REMOTE.match(source):
                self.remote.add(source)
                continue
            found = _find(source)
            if found is None:
                missing[source] = "shard" if shard else "image file"
            else:
                table[source] = found
        if missing:
            first, kind = next(iter(missing.items()))
            raise UserError(f"{len(missing)} of the image files and shards that {where} records are gone from where "
                            f"`multimodal embed` read them (the first, a {kind}: {first}): thumbnails are read only "
                            "from there, so put them back, or embed the images again from where they are now.")

    def __bool__(self) -> bool:
        return bool(self.files or self.shards)

    def has(self, meta: dict) -> bool:
        return meta.get("url") in self.shards if "url" in meta else meta.get("file_name") in self.files

    def jpeg(self, row: int, meta: dict) -> bytes:
        """The JPEG thumbnail of `row`, whose record is `meta`; raises Unavailable."""
        with self._lock:
            if row in self._cache:
                self._cache.move_to_end(row)
                return self._cache[row]
        data = self._image_bytes(meta)
        try:
            image = decode_file(data, min_side=SIDE)
        except BadSample as bad:
            raise Unavailable(f"The image of row {row} cannot be read ({bad.kind}).") from None
        image = Image.fromarray(image) if not isinstance(image, Image.Image) else image
        thumb = ImageOps.contain(image, (SIDE, SIDE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()  # in memory: nothing is written to disk
        thumb.save(buf, "JPEG", quality=85)
        with self._lock:
            self._cache[row] = buf.getvalue()
            if len(self._cache) > CACHED:
                self._cache.popitem(last=False)
        return buf.getvalue()

    def _image_bytes(self, meta: dict) -> bytes:
        if "url" in meta:
            shard = self.shards.get(meta["url"])
            if shard is None:
                raise Unavailable("This row's shard is not a local file read at start-up: it has no thumbnail.")
            offset, size = self._table(shard).get(str(meta.get("key")), (None, 0))
            if offset is None:
                raise Unavailable(f"The shard holds no image of the sample {meta.get('key')!r} any more.")
            return _read(shard, offset, size)
        found = self.files.get(meta.get("file_name"))
        if found is None:
            raise Unavailable("This row records no local image file: it has no thumbnail.")
        return _read(found, 0, None)

    def _table(self, shard: _Found) -> dict[str, tuple[int, int]]:
        """key -> (offset, size) of each sample's image member in a shard (headers read once, then kept)."""
        with self._lock:
            if shard.path in self._tables:
                self._tables.move_to_end(shard.path)
                return self._tables[shard.path]
        fd = _open(shard)
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with os.fdopen(fd, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    match = WDS_NAME.match(info.name)
                    if info.isreg() and match:
                        members.setdefault(match.group(1), {})[match.group(2)] = (info.offset_data, info.size)
        except (tarfile.TarError, OSError) as exc:
            raise Unavailable(f"The shard cannot be read as an uncompressed tar ({exc}).") from None
        keys = (self.image_key,) if self.image_key else IMAGE_KEYS
        table = {key: next(found[k] for k in keys if k in found) for key, found in members.items()
                 if any(k in found for k in keys)}
        with self._lock:
            self._tables[shard.path] = table
            if len(self._tables) > SHARD_TABLES:
                self._tables.popitem(last=False)
        return table


def identity(info: os.stat_result) -> tuple:
    """What tells a file from another put in its place: an inode number alone is reused at once."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _find(source: str) -> _Found | None:
    """The file `source` names (relative: to the current folder, as `embed` recorded it), resolved, if it is a
    regular file."""
    path = os.path.realpath(source)
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return _Found(path, info) if stat.S_ISREG(info.st_mode) else None


def _open(found: _Found) -> int:
    """A descriptor of the file found at start-up, opened without following a link, or Unavailable when the path
    holds another file now."""
    try:
        fd = os.open(found.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Unavailable(f"The image's file cannot be opened ({exc.strerror}).") from None
    info = os.fstat(fd)
    if identity(info) != found.identity or not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise Unavailable("The image's file was replaced after the server started: it is not read.")
    return fd


def _read(found: _Found, offset: int, size: int | None) -> bytes:
    """`size` bytes at `offset` of a file found at start-up (None: the whole file), within the image size limit."""
    most = limit(IMAGE_BYTES)
    fd = _open(found)
    try:
        size = os.fstat(fd).st_size if size is None else size
        if size > most:
            raise Unavailable(f"The image is {size} bytes, over the limit of {most} ({IMAGE_BYTES}).")
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def image_key_of(info: dict) -> str | None:
    """The image member an embedding folder's samples were read from (`embed --image_key`), if one was chosen."""
    members = info.get("members")
    key = members.get("image_key") if isinstance(members, dict) else None
    return key if isinstance(key, str) else None


def for_target(target, where: Path) -> Thumbnails:
    """The thumbnails of an images `Target` (engine.py): of an index, its embedding folder's sources."""
    from multimodal.eval.embed import read_info

    info = target.collection.info
    if "embeddings" in info:  # an index folder: the members option is in its embedding folder's info.json
        info = read_info(Path(info["embeddings"]))
    return Thumbnails(target.all_metas(), image_key_of(info), where=str(where))
