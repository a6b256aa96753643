"""Where caches live: a local directory or any fsspec URL (s3://, gs://, ...), through one small API.

HDF5 files are always written locally first (h5py needs a seekable file), closed and checked, then uploaded
once, to their final key: a single PUT, or a multipart upload whose part size is chosen from the file's size
(upload_part_bytes). Either appears whole or not at all, so no temporary key and no server-side copy are needed
(s3fs's copy uses fixed 50 MiB parts, so a move fails past 10,000 parts: ~488 GiB).

Background runs the close-and-upload of finished files (and what must follow them, in order) on a thread of its
own, so the teacher never waits on storage unless storage falls behind, and then memory and disk stay bounded.

Remote writes and downloads are retried with backoff (`retrying`). The client library already retries each
request (botocore: a few attempts per call); ours retries the whole step (the whole upload), so a network that is
down for a minute costs a pause, not the run. What is still failing after that becomes a StorageError that
names the target and the cause. Credentials come from fsspec's usual places (environment, ~/.aws, or
output.storage_options) and never appear in a message here: errors quote URIs and the library's message only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from kd_core.errors import ConfigError, StorageError

log = logging.getLogger("kd_core.io")
T = TypeVar("T")

MiB = 1 << 20
S3_MAX_PARTS = 10_000  # S3's limits on a multipart upload
S3_MIN_PART_BYTES = 5 * MiB
MIN_UPLOAD_PART_BYTES = 16 * MiB  # fewer requests than the minimum, still small in memory
READ_BLOCK_BYTES = 2 << 20  # remote random access: a sample touches ~6 chunks of <= 1 MiB compressed
READ_CACHE_BLOCKS = 8  # per open remote file: at most 16 MiB of cached blocks, so random access costs few requests
RETRY_DELAYS = (2.0, 8.0, 30.0)  # seconds between attempts of a remote write/download: 4 attempts, ~40 s
# Errors that retrying cannot fix: a missing bucket, denied access, a full disk.
_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _transient(e: BaseException) -> bool:
    if isinstance(e, _PERMANENT) or (isinstance(e, OSError) and e.errno in _PERMANENT_ERRNOS) or is_disk_full(e):
        return False
    try:
        from botocore.exceptions import BotoCoreError  # connection refused/reset, timeouts, bad responses
    except ImportError:
        BotoCoreError = OSError
    return isinstance(e, (OSError, TimeoutError, ConnectionError, BotoCoreError))


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as HDF5 reports it (an OSError whose errno h5py may leave unset)."""
    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)
                                       or "errno = 28" in str(e))


@contextlib.contextmanager
def disk_full_is_fatal(output: str | Path | None = None, staging: str | Path | None = None):
    """Turn a full local disk into one StorageError (not retried: a retry fails the same way) that names the disk
    that is full: the local output directory (`output`), the local staging directory (`staging`), or both when they
    share a disk. The error's own file name decides when it has one; else the disk with less free space."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise StorageError(_disk_full_message(e, {"output": output, "staging": staging})) from None


_DISKS = {"output": ("the output directory (output.uri)", "free space there, or choose an output.uri on a larger disk"),
          "staging": ("the local staging directory (KD_CACHE_STAGING)", "free space there, or point KD_CACHE_STAGING "
                      "at a larger disk")}


def _disk_full_message(e: OSError, disks: dict[str, str | Path | None]) -> str:
    found = {what: Path(path) for what, path in disks.items() if path is not None}
    usage = {what: _usage(path) for what, path in found.items()}  # (device, free bytes) or None
    name = getattr(e, "filename", None)
    full = [what for what, path in found.items() if name and str(name).startswith(str(path))][:1]
    if not full and found:
        known = {w: u for w, u in usage.items() if u is not None}
        if len({dev for dev, _ in known.values()}) == 1 and len(known) == len(found):
            full = list(found)  # one disk holds both
        elif known:
            full = [min(known, key=lambda w: known[w][1])]
        else:
            full = list(found)
    held = " and ".join(f"{_DISKS[w][0]} {found[w]}" for w in full) or "the local scratch directory"
    free = usage.get(full[0]) if full else None
    fixes = "; ".join(_DISKS[w][1] for w in full) or "free space there"
    room = f"{free[1] / 1e9:.2f} GB free now" if free else "free space unknown"
    return (f"no space left on the disk holding {held} ({room}). Nothing incomplete was kept under a final name and completed parts are kept. Fix: {fixes}, "
            "then run again: it continues after the last complete part.")


def _usage(path: Path) -> tuple[int, int] | None:
    """(device id, free bytes) of the disk holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return path.stat().st_dev, shutil.disk_usage(path).free
    except OSError:
        return None


def retrying(what: str, fn: Callable[[], T], *, transient: Callable[[BaseException], bool] | None = None,
             delays: Iterable[float] | None = None, error: type[Exception] | None = StorageError) -> T:
    """fn(), tried again after each of `delays` (seconds) while it fails with an error `transient` accepts.

    The one retry loop of kd-cache. Storage (the defaults): transient errors are network errors and timeouts (not
    a missing bucket, denied access or a full disk), retried after RETRY_DELAYS; what still fails becomes a
    StorageError that names `what` and the cause. error=None re-raises the last error as it is (callers with
    errors of their own, e.g. the Prefect API's in flows/fan_out.py). Sync: an async caller runs it in a thread.
    """
    transient = transient or _transient
    for attempt, delay in enumerate((*(RETRY_DELAYS if delays is None else delays), None), start=1):
        try:
            return fn()
        except Exception as e:
            retry = transient(e)
            if retry and delay is not None:
                log.warning("%s: %s: %s (attempt %d), retrying in %.1f s", what, type(e).__name__, e, attempt, delay)
                time.sleep(delay)
                continue
            if error is None:
                raise
            if not retry:
                raise error(f"{what}: {type(e).__name__}: {e}") from None
            raise error(
                f"{what}: still failing after {attempt} attempts ({type(e).__name__}: {e}). Check the endpoint, "
                "network and credentials, then run again: completed parts are kept and nothing was published."
            ) from None
    raise AssertionError("unreachable")


def jittered_backoff(tries: int, cap: float = 60.0) -> list[float]:
    """Delays for `tries` attempts: exponential (1, 2, 4, ... s, at most `cap`) with full jitter, so that many
    callers failing together do not retry in step."""
    return [random.uniform(0, min(cap, 2.0 ** attempt)) for attempt in range(tries - 1)]


# user:password@ in a URL; the password may hold '/' (unescaped), so anything up to an '@' after 'user:' counts.
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^@\s]+@", re.IGNORECASE)


def normalise_uri(uri: str, key: str = "output.uri") -> str:
    """The one form of a location that every path under it derives from: an absolute local path, or
    PROTOCOL://BUCKET/PREFIX without a trailing slash. ConfigError (naming `key`) for a value that would write
    somewhere other than meant: empty (an unset shell variable), no bucket, `s3:/x` (a local dir named `s3:`),
    the filesystem root, or credentials inside the URL."""
    text = uri.strip()
    if not text:
        raise ConfigError(f"{key} is empty (an unset shell variable?). Set it to a directory or a URL such as "
                          "s3://bucket/prefix.")
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        protocol, _, rest = text.partition("://")
        rest = rest.strip("/")
        bucket = rest.split("/")[0]
        if not bucket:
            raise ConfigError(f"{key}: {uri!r} names no bucket. Fix: {key}={protocol}://BUCKET/PREFIX.")
        if "@" in bucket or URL_WITH_PASSWORD.match(text):
            raise ConfigError(f"{key}: credentials inside the URL are not accepted (they would be recorded). Put "
                              "them in the worker's environment or a Prefect Secret block (docs/DEPLOYMENT.md).")
        return f"{protocol}://{rest}"
    first = text.split("/")[0]
    if first.endswith(":") or not text:
        raise ConfigError(f"{key}: {uri!r} looks like a URL with a slash missing (it would be a local directory "
                          f"named {first!r}). Fix: e.g. {key}=s3://bucket/prefix, or a directory path.")
    path = os.path.abspath(os.path.expanduser(text))
    if path == os.path.abspath(os.sep):
        raise ConfigError(f"{key}: the filesystem root is not an output directory. Choose a directory below it.")
    return path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


# Credentials a worker read at run time (a Prefect Secret block named by output.credentials), per output root.
# Held in this process only: never in a Config, so never in a parameter, a log, a manifest or a file attribute.
_CREDENTIALS: dict[str, dict[str, Any]] = {}


def use_credentials(root: str, options: dict[str, Any]) -> None:
    """Use `options` (fsspec's key, secret, token, ...) for every URI under `root` in this process."""
    _CREDENTIALS[root.rstrip("/")] = dict(options)


def _with_credentials(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    for root, credentials in _CREDENTIALS.items():
        if uri == root or uri.startswith(root + "/"):
            return {**(storage_options or {}), **credentials}
    return storage_options or {}


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    storage_options = _with_credentials(uri, storage_options)
    if is_local(uri):
        return url_to_fs(uri, **(storage_options or {}))
    # No listings cache: other processes (shard workers, a concurrent run) write here, and a stale listing
    # would hide their records and locks from this one.
    return url_to_fs(uri, **{"use_listings_cache": False, **(storage_options or {})})


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "r") as f:
        return f.read()


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_text(uri, storage_options))


def write_text_atomic(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    """Locally: write a temporary file next to the target, then rename it into place (a failed write, e.g. a full
    disk, leaves neither a partial target nor the temporary file). Remotely: one PUT, which object stores apply
    atomically (no temporary key, no copy)."""
    if is_local(uri):
        path = local_path(uri)
        tmp = _write_temporary(path, text)
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri, storage_options)
    retrying(f"writing {uri}", lambda: fs.pipe_file(path, text.encode()))


def _write_temporary(path: Path, text: str) -> str:
    """A hidden temporary file beside `path` holding `text`, synced; removed again if writing it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def write_json_atomic(uri: str, data: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_text_atomic(uri, json.dumps(data, indent=2, sort_keys=True), storage_options)


def file_digest(path: str | Path, upload_part_bytes: int | None = None) -> tuple[str, str]:
    """(sha256 of the file, the ETag S3 gives it when uploaded in parts of upload_part_bytes: the MD5 of the
    bytes for a single PUT, else the MD5 of the parts' MD5s plus "-<parts>"). One read of the file."""
    sha, whole, part_md5s = hashlib.sha256(), hashlib.md5(), []
    step = upload_part_bytes or (1 << 62)  # a multiple of the 1 MiB blocks read here
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
            whole.update(block)
            # Blocks never straddle an upload part: step is a multiple of the block or the block is smaller.
            if f.tell() % step == 0 or f.tell() == os.fstat(f.fileno()).st_size:
                part_md5s.append(whole.digest())
                whole = hashlib.md5()
    if len(part_md5s) <= 1:
        etag = (part_md5s[0] if part_md5s else hashlib.md5().digest()).hex()
    else:
        etag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
    return sha.hexdigest(), f'"{etag}"'


def upload_part_bytes(size: int) -> int:
    """Part size of a multipart upload of `size` bytes: whole MiB, at least 16 MiB (S3: >= 5 MiB), and large
    enough that the upload takes at most 10,000 parts (S3's limit). A file under two parts goes in one PUT."""
    return max(MIN_UPLOAD_PART_BYTES, -(-size // (S3_MAX_PARTS * MiB)) * MiB)


def publish_file(local: str | Path, uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move (local target) or upload (remote target) a finished file to its final name, written once.

    Returns {"sha256", "etag", "mtime_ns"}: the file's sha256 (from the local copy, before it leaves), and what
    later shows the object is still the one published: the ETag the store reports (checked against the one
    computed locally, which proves the upload arrived intact) or a local file's modification time.

    Either way the local file is gone afterwards: renamed, or (remote) deleted once the upload is confirmed or has
    failed for good, so local staging holds only files still on their way (a failed part is recomputed by the
    next run, never uploaded from a leftover).
    """
    if is_local(uri):
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        sha256, _ = file_digest(local)
        if Path(local).resolve() != dest.resolve():
            os.replace(local, dest)
        return {"sha256": sha256, "etag": None, "mtime_ns": dest.stat().st_mtime_ns}
    try:
        return _upload(local, uri, storage_options)
    finally:
        Path(local).unlink(missing_ok=True)


def _upload(local: str | Path, uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    fs, path = filesystem(uri, storage_options)
    part = upload_part_bytes(os.path.getsize(local))
    sha256, etag = file_digest(local, part)

    def upload() -> str | None:
        fs.put_file(str(local), path, chunksize=part)  # s3fs: one PUT under 2 parts, else a multipart upload
        return fs.info(path).get("ETag")

    stored = retrying(f"uploading {uri}", upload)
    if stored is not None and stored != etag and "-" not in stored and len(stored.strip('"')) == 32:
        # A plain MD5 ETag that differs: the bytes stored are not the bytes sent.
        raise StorageError(f"uploading {uri}: the store holds different bytes (ETag {stored}, sent {etag}). Run again.")
    return {"sha256": sha256, "etag": stored, "mtime_ns": None}


class Background:
    """Jobs run one at a time, in submission order, on one background thread: closing and publishing finished files,
    then the records that must follow them. Ordering is the contract: a record submitted after its files is
    written after them.

    Bounded: at most `files` jobs that hold a local file (those submitted with an `abort`) wait or run at once;
    submit blocks while that many do (back-pressure: when storage is slower than the teacher, the teacher waits;
    memory and local disk never grow). files=0 runs each job in the caller, at submit (no overlap).

    The first error stops it: later jobs are dropped (their abort called) and the error is raised in the caller by
    its next submit, check or close, as the same exception object (so a full disk or a StorageError reads the
    same as when the caller ran the job). On leaving a `with` block, the jobs already submitted still run
    (they are finished work), then the thread is joined: nothing is left writing after the block.
    """

    def __init__(self, files: int):
        self.files = files
        self._jobs: deque[tuple[Callable[[], None], Callable[[], None] | None]] = deque()
        self._held = 0  # jobs holding a file, waiting or running
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kd-publish", daemon=True) if files else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, job: Callable[[], None], abort: Callable[[], None] | None = None) -> None:
        """Run job() after every job submitted before it. abort: the job holds a local file, counted against
        `files`; abort() drops that file if job never runs."""
        if self._thread is None:
            job()
            return
        with self._cond:
            while abort is not None and self._held >= self.files and self._error is None:
                self._cond.wait()
            if self._error is not None:
                _quietly(abort)
                raise self._error
            self._jobs.append((job, abort))
            self._held += abort is not None
            self._cond.notify_all()

    def check(self) -> None:
        """Raise the background's error, if any (cheap: call it as often as convenient)."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every submitted job, then raise the first error."""
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()
        self.check()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, abort = self._jobs[0]  # still counted while it runs: its file is still on disk
            try:
                if self._error is None:
                    job()
                else:
                    _quietly(abort)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._error = e
            with self._cond:
                self._jobs.popleft()
                self._held -= abort is not None
                self._cond.notify_all()

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the caller's error is the one to raise; the background's own is logged
            self.close()
        except BaseException as e:  # noqa: BLE001
            if e is not exc:
                log.warning("while stopping on %s: background publishing failed too: %s: %s",
                            exc_type.__name__, type(e).__name__, e)


def _quietly(abort: Callable[[], None] | None) -> None:
    try:
        if abort is not None:
            abort()
    except Exception as e:  # noqa: BLE001 - dropping a file must not hide the error that got us here
        log.warning("could not drop a local file: %s: %s", type(e).__name__, e)


def stamps(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every file under `uri` (relative name -> {"size", "etag", "mtime_ns"}), in one listing (S3: one request
    per 1,000 objects). What merge compares with the records instead of reading the files."""
    if is_local(uri):
        root = local_path(uri)
        files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
        return {str(p.relative_to(root)): {"size": st.st_size, "etag": None, "mtime_ns": st.st_mtime_ns}
                for p in files for st in [p.stat()]}
    fs, root = filesystem(uri, storage_options)
    if not fs.exists(root):
        return {}
    prefix = len(root.rstrip("/")) + 1
    return {path[prefix:]: {"size": info["size"], "etag": info.get("ETag"), "mtime_ns": None}
            for path, info in fs.find(root, detail=True).items()}


def sha256_of(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """sha256 of a file's bytes, streamed (no local copy)."""
    fs, path = filesystem(uri, storage_options)

    def digest() -> str:
        sha = hashlib.sha256()
        with fs.open(path, "rb", block_size=READ_BLOCK_BYTES) as f:
            while block := f.read(READ_BLOCK_BYTES):
                sha.update(block)
        return sha.hexdigest()

    return retrying(f"reading {uri}", digest)


def fetch_file(uri: str, local: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """Download `uri` to a local path front to back (one GET stream on S3), retrying transient errors."""
    fs, path = filesystem(uri, storage_options)
    retrying(f"downloading {uri}", lambda: fs.get_file(path, str(local)))


def create_exclusive(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Create `uri` holding `text` only if nothing is there: True if created, False if it already existed. The file
    appears whole or not at all: a full disk while writing it leaves no empty file behind (a lock file that
    would block the next run for a lease).

    Local: the text is written to a temporary file, then hard-linked to `uri` (link fails if `uri` exists).
    S3: a conditional PUT (If-None-Match: *), which S3 and moto honour.
    """
    if is_local(uri):
        path = local_path(uri)
        tmp = _write_temporary(path, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "xb") as f:
            f.write(text.encode())
    except FileExistsError:
        return False
    return True


def remove(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_target(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail before any work when output.uri cannot be written: ConfigError naming the key and the fix."""
    if is_local(uri):
        path = local_path(uri).absolute()
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"output.uri: {path} cannot be created, {existing} is a file. Choose a directory.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output.uri: {existing} is not writable by this user, so {path} cannot be written. "
                              "Fix the permissions or choose another output.uri.")
        return
    try:
        fs, path = filesystem(uri, storage_options)
        bucket = path.strip("/").split("/")[0]
        found = fs.exists(bucket)
    except (ImportError, ValueError) as e:  # unknown protocol, or its fsspec package is not installed
        raise ConfigError(f"output.uri: no filesystem for {uri.split('://')[0]}:// ({e}).") from None
    except Exception as e:
        raise StorageError(f"output.uri: cannot reach {uri} ({type(e).__name__}: {e}). Check the endpoint, "
                           "network and credentials (environment, ~/.aws or output.storage_options).") from None
    if not found:
        raise ConfigError(f"output.uri: bucket {bucket!r} does not exist, or these credentials cannot see it. "
                          f"Create it or fix output.uri ({uri}).")


def open_for_read(uri: str, storage_options: dict[str, Any] | None = None, block_size: int = READ_BLOCK_BYTES):
    """(file object or None for a local path, size in bytes). h5py opens either. Remote reads go in cached
    blocks of block_size: large for data, small when only a file's metadata is wanted."""
    if is_local(uri):
        return None, local_path(uri).stat().st_size
    fs, path = filesystem(uri, storage_options)
    f = fs.open(path, "rb", block_size=block_size, cache_type="blockcache",
                cache_options={"maxblocks": READ_CACHE_BLOCKS})
    return f, fs.size(path)
