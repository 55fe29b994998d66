"""An embedding folder on object storage (`embed --out s3://bucket/emb`, any fsspec URL), as training mirrors
its run folders (`multimodal.remote`: the same URLs, credentials and staging folder).

The run writes its parts into a local working copy (`remote.staging`: under `$MULTIMODAL_STAGING`) as it writes
a local folder, and uploads each part when it is finished, its index files last (on an object store an object
appears whole or not at all), then removes the part's local files: the working copy holds the parts being
embedded, not the collection. A part is done when the bucket holds its index files, so a run resumed on any
machine skips what the bucket holds. Runs on other nodes share the bucket by part ranges (`--parts`, or the
ranks of a launcher); the part locks that keep two runs of one part apart (`embed.Claim`) are a node's own.
"""

import re
from pathlib import Path

from multimodal import remote
from multimodal.files import write_bytes

SUBFOLDERS = ("img_emb", "text_emb", "metadata", "img_index", "text_index")


class Bucket:
    """The embedding folder at `url` and its local working copy `local`."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.local = remote.staging(self.url)
        self.fs, self.path = remote.filesystem(self.url)

    def _remote(self, *parts: str) -> str:
        return remote.join(self.path, *parts)

    def check_writable(self) -> None:
        remote.check_writable(self.url, "the embedding folder")

    def pull_info(self) -> bool:
        """The bucket's info.json copied into the working copy (in place of any there; none where the bucket has
        none) for the claim to compare the run's settings with; whether the prefix holds objects without one (not
        an embedding folder, which the claim refuses unless --overwrite)."""
        try:
            found = self.fs.exists(self._remote("info.json"))
            data = self.fs.cat_file(self._remote("info.json")) if found else None
            holds = not found and self.fs.exists(self.path) and bool(self.fs.ls(self.path, detail=False))
        except Exception as exc:  # noqa: BLE001 - the back end's own errors (botocore's, aiohttp's...)
            raise remote.failure(self.url, exc, "read the embedding folder at") from None
        if data is None:
            (self.local / "info.json").unlink(missing_ok=True)
        else:
            write_bytes(self.local / "info.json", data)
        return holds

    def push_info(self) -> None:
        self._upload([self.local / "info.json"], keep=True)

    def clear(self) -> None:
        """Every part in the bucket removed (the run replaces a folder made with other settings)."""
        try:
            for sub in SUBFOLDERS:
                if self.fs.exists(self._remote(sub)):
                    self.fs.rm(self._remote(sub), recursive=True)
        except Exception as exc:  # noqa: BLE001
            raise remote.failure(self.url, exc, "clear the embedding folder at") from None

    def discard(self, files: list[Path]) -> None:
        """Parts' `files` (working-copy paths, in the order written) removed from the bucket, each part's index
        files first: a part without them is not done, and a later run embeds it again."""
        try:
            for file in reversed(files):
                target = self._remote(*file.relative_to(self.local).parts)
                if self.fs.exists(target):
                    self.fs.rm(target)
        except Exception as exc:  # noqa: BLE001
            raise remote.failure(self.url, exc, "remove parts from the embedding folder at") from None

    def done(self, kinds: list[str]) -> set[int]:
        """The parts whose index files (of every kind in `kinds`) the bucket holds."""
        found = []
        try:
            self.fs.invalidate_cache()
            for kind in kinds:
                folder = self._remote(f"{kind}_index")
                names = self.fs.ls(folder, detail=False) if self.fs.exists(folder) else []
                found.append({int(m.group(1)) for name in names
                              if (m := re.fullmatch(r"part-(\d+)\.jsonl", name.rsplit("/", 1)[-1]))})
        except Exception as exc:  # noqa: BLE001
            raise remote.failure(self.url, exc, "list the embedding folder at") from None
        return set.intersection(*found)

    def publish(self, files: list[Path]) -> None:
        """A finished part's `files` (in the order written: index files last) to the bucket, then removed here."""
        self._upload(files, keep=False)

    def _upload(self, files: list[Path], keep: bool) -> None:
        target = self.url
        try:
            for file in files:
                target = remote.join(self.url, *file.relative_to(self.local).parts)
                remote.upload(file, target)
        except Exception as exc:  # noqa: BLE001
            raise remote.failure(target, exc, "upload the embeddings to") from None
        for file in reversed(files if not keep else []):
            file.unlink(missing_ok=True)
