"""Run folders on object storage (`s3://`, `gs://`, any fsspec URL): a local working copy, mirrored.

A run whose run root (the first folder logger's save_dir/name, under `trainer.default_root_dir` when that is a
URL and save_dir is relative) is a URL trains in a local working copy of its run folder, under
`$MULTIMODAL_STAGING` (default `~/.cache/multimodal/runs`), so that every part of the trainer writes local
files as before, and mirrors it to the URL: each checkpoint right after its atomic local write (`Mirror`,
the strategy's CheckpointIO: the upload completes before training goes on, and a checkpoint the run prunes
is deleted there too), then the logs (config.yaml, hparams.yaml, metrics.csv, TensorBoard's events, the
MLflow run id); and once more when the run ends or stops. On an object store an object appears whole or not
at all (S3 shows an upload, single or multipart, only once complete; GCS and Azure likewise): a checkpoint
is uploaded under its own name. On other fsspec file systems it is uploaded to a partial name and renamed.

`--resume URL` and `--resume auto` with a URL root download the run's config, logs and last.ckpt into the
working copy and continue there. Credentials and endpoints come from where fsspec's back end reads them (for
S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL, ~/.aws, instance roles).
"""

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from pytorch_lightning.plugins import TorchCheckpointIO

from multimodal.errors import UserError, first_line

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # an object appears only once uploaded whole
LOGS = ("config.yaml", "hparams.yaml", "metrics.csv", "mlflow_run_id", "events.out.tfevents.*")


def is_url(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path) and not str(path).startswith("file://")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def filesystem(url: str):
    """(fsspec file system, path within it) of `url`; a missing back end (s3fs for s3://) is one sentence."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UserError(f"Cannot open {url}: {first_line(exc)} (for s3:// install s3fs, for gs:// gcsfs).") from None


def staging(url: str) -> Path:
    """The local working copy of the remote folder `url`: STAGING/PROTOCOL/BUCKET/PATH, so that a folder's
    copy holds its subfolders' copies."""
    base = Path(os.environ.get("MULTIMODAL_STAGING") or Path.home() / ".cache" / "multimodal" / "runs")
    protocol, _, rest = url.partition("://")
    return (base / protocol / rest.strip("/")).resolve()


def failure(url: str, exc: BaseException, doing: str) -> UserError:
    """One sentence for what went wrong `doing` something at `url`."""
    name, text = type(exc).__name__, first_line(exc, 160)
    if name == "NoCredentialsError":
        why = "no credentials were found (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws)"
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Access Denied" in text:
        why = "the credentials in use may not write there (access denied)"
    elif isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        why = "its bucket does not exist"
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError") \
            or isinstance(exc, (ConnectionError, TimeoutError)):
        why = f"its endpoint cannot be reached ({text}; for a non-AWS endpoint set AWS_ENDPOINT_URL)"
    else:
        why = f"{name}: {text}"
    return UserError(f"Cannot {doing} {url}: {why}.")


def check_writable(url: str, what: str = "the run folder") -> None:
    """Write and delete a probe object under `url`, before a run claims anything there (`what`: the folder, in
    the sentence of a failure)."""
    fs, path = filesystem(url)
    probe = join(path, f".multimodal-probe-{secrets.token_hex(4)}")
    try:
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - the back end's own errors (botocore's, aiohttp's...)
        raise failure(url, exc, f"write {what} to") from None


def versions(url: str) -> list[int]:
    """The N of the `version_N` folders under the remote run root `url`."""
    fs, path = filesystem(url)
    try:
        names = [Path(p).name for p in fs.ls(path, detail=False)] if fs.exists(path) else []
    except Exception as exc:  # noqa: BLE001
        raise failure(url, exc, "list the runs at") from None
    return [int(m.group(1)) for n in names if (m := re.fullmatch(r"version_(\d+)", n))]


def claim(url: str, version: int) -> None:
    """Mark `url/version_N` as taken (an object in it). Object stores have no atomic create-if-absent for
    every back end: two runs started at the same moment under one root may pick one number; runs started one
    after the other never do."""
    fs, path = filesystem(url)
    try:
        fs.pipe_file(join(path, f"version_{version}", ".claimed"), b"")
    except Exception as exc:  # noqa: BLE001
        raise failure(url, exc, "claim a run folder at") from None


def upload(local: Path, url: str) -> None:
    """`local` to `url`, whole or not at all (see the module's note)."""
    fs, path = filesystem(url)
    if fs.protocol and set(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) & set(OBJECT_STORES):
        fs.put_file(str(local), path)
    else:
        partial = f"{path}.partial-{secrets.token_hex(4)}"
        fs.put_file(str(local), partial)
        fs.mv(partial, path)


def push_logs(folder: Path, url: str) -> None:
    """The run folder's logs (not its checkpoints) to its remote copy."""
    for pattern in LOGS:
        for file in folder.glob(pattern):
            if file.is_file():
                upload(file, join(url, file.name))


def resume_from(folder: Path, local_rank: str) -> Path:
    """Where, in a working copy, a process downloads the checkpoint it continues from: one file a process of a
    node (every rank loads the checkpoint itself), outside checkpoints/."""
    return folder / ".resume" / f"last.rank{local_rank}.ckpt"


def pull(url: str, folder: Path, target: Path, logs: bool) -> Path:
    """What continuing the remote run `url` needs, into its working copy `folder`: its logs (`logs`: for the
    process that writes them), and its last.ckpt as `target` (`resume_from`: not in checkpoints/, where
    ModelCheckpoint, restored from another node's working copy, would take it for someone else's file and
    write last-v1.ckpt beside it). The checkpoint must load: one cut short in the bucket is one sentence
    naming it, and its working copy is removed. Returns `target`."""
    fs, path = filesystem(url)
    try:
        names = [Path(p).name for p in fs.ls(path, detail=False)]
        if not fs.exists(join(path, "checkpoints", "last.ckpt")):
            raise UserError(f"Nothing to resume at {url}: it has no checkpoints/last.ckpt.")
        target.parent.mkdir(parents=True, exist_ok=True)
        for name in names if logs else []:
            if any(Path(name).match(pattern) for pattern in LOGS):
                fs.get_file(join(path, name), str(folder / name))
        fs.get_file(join(path, "checkpoints", "last.ckpt"), str(target))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise failure(url, exc, "download the run at") from None
    from multimodal.weights import read_checkpoint

    try:
        read_checkpoint(target)
    except UserError as exc:
        shutil.rmtree(folder, ignore_errors=True)  # the working copy of a run that cannot continue
        raise UserError(f"The checkpoint {join(url, 'checkpoints', 'last.ckpt')} cannot be resumed from: "
                        f"{str(exc)[0].lower()}{str(exc)[1:]}") from None
    return target


class Mirror(TorchCheckpointIO):
    """A CheckpointIO that writes through another (`inner`, the atomic local writer) and mirrors the run
    folder `local` to `url`: each checkpoint uploaded when written, deleted when the run prunes it, then the
    logs; `flush` uploads the logs once more."""

    def __init__(self, inner: TorchCheckpointIO, local: Path, url: str):
        super().__init__()
        self.inner, self.local, self.url = inner, local.resolve(), url

    def _remote(self, path) -> str:
        relative = Path(str(path)).resolve().relative_to(self.local)
        return join(self.url, *relative.parts)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options)
        try:
            upload(Path(path), self._remote(path))
            push_logs(self.local, self.url)
        except Exception as exc:  # noqa: BLE001
            raise failure(self._remote(path), exc, "upload the checkpoint to") from None

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)
        fs, remote = filesystem(self._remote(path))
        if fs.exists(remote):
            fs.rm_file(remote)

    def flush(self) -> None:
        push_logs(self.local, self.url)
