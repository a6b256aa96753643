"""A lease lock on any fsspec target, so two runs never write the same shard (or merge) at the same time.

The lock is a small JSON object created exclusively (O_EXCL locally, a conditional PUT on S3) holding its owner
and an expiry time. The holder refreshes the expiry from a background thread; a holder that dies stops
refreshing, and its lock can be taken over once the lease has run out. On the holder's own host a dead pid is
noticed at once, so a run restarted after a kill -9 on the same machine does not wait for the lease.

Expiry times are wall-clock seconds: hosts that share an output need clocks within a fraction of LEASE_SECONDS.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kd_core import io
from kd_core.errors import StorageError

log = logging.getLogger("kd_core.locks")

# A dead holder's lock is taken over after this long. KD_CACHE_LEASE_SECONDS shortens it for tests; every host that
# shares an output should use the same value (the holder writes its expiry into the lock, readers trust that).
LEASE_SECONDS = float(os.environ.get("KD_CACHE_LEASE_SECONDS", "120"))
REFRESH_SECONDS = LEASE_SECONDS / 4


# Tokens of locks this process held but could not remove (the target was down): a later run in this process
# may take them over at once, since their holder is known to be gone.
_unreleased: set[str] = set()


class LockedError(StorageError):
    """Another live run holds the lock."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about its holder. `damaged` when the file is not a lock this code wrote."""

    host: str
    pid: int
    token: str
    expires: float
    damaged: bool = False

    @classmethod
    def parse(cls, text: str, written_at: float) -> "Holder":
        """The holder from the file's text; a damaged file (wrong types, missing keys, not JSON) counts as held
        until a lease after it was last written (its modification time), then as stale."""
        try:
            data = json.loads(text)
            return cls(host=str(data["host"]), pid=int(data["pid"]), token=str(data["token"]),
                       expires=float(data["expires"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls(host="?", pid=-1, token="", expires=written_at + LEASE_SECONDS, damaged=True)


def read_holder(uri: str, storage_options: dict[str, Any] | None = None) -> Holder | None:
    """The holder of the lock at `uri`, or None when there is no lock file."""
    fs, path = io.filesystem(uri, storage_options)
    try:
        text = io.read_text(uri, storage_options)
        written_at = _modified(fs, path)
    except FileNotFoundError:  # released meanwhile
        return None
    return Holder.parse(text, written_at)


def _modified(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, FileNotFoundError, OSError):
        return time.time()  # unknown: count it as just written


def _stale(holder: Holder, here: str) -> bool:
    """True when the holder is certainly gone: its lease ran out, or it was a process on this host that died."""
    if holder.expires < time.time() or holder.token in _unreleased:
        return True
    return not holder.damaged and holder.host == here and not _pid_alive(holder.pid)


def is_held(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a live run holds the lock at `uri` (for readers that must not disturb it, e.g. pruning)."""
    holder = read_holder(uri, storage_options)
    return holder is not None and not _stale(holder, socket.gethostname())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_state(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """("held", token) while a live holder refreshes it, ("stale", token) once its holder stopped (expired, or a
    dead pid here), ("free", None) when there is no lock."""
    holder = read_holder(uri, storage_options)
    if holder is None:
        return "free", None
    return ("stale" if _stale(holder, socket.gethostname()) else "held"), holder.token


class LeaseLock:
    """`with LeaseLock(uri, what):` holds the lock at `uri` for the block, or raises LockedError at once."""

    def __init__(self, uri: str, what: str, storage_options: dict[str, Any] | None = None,
                 wait_seconds: float = 0.0):
        self.uri, self.what, self.opts, self.wait_seconds = uri, what, storage_options, wait_seconds
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps({**self.owner, "what": self.what, "expires": time.time() + LEASE_SECONDS})

    def _read(self) -> Holder | None:
        return read_holder(self.uri, self.opts)

    def acquire(self) -> None:
        """Take the lock, waiting up to wait_seconds for a live holder to let go; LockedError after that."""
        deadline, told = time.monotonic() + self.wait_seconds, False
        while not self._try_acquire(final=time.monotonic() >= deadline):
            if not told:
                log.info("waiting for another run to finish %s (lock %s)", self.what, self.uri)
                told = True
            time.sleep(min(1.0, max(0.05, self.wait_seconds / 100)))
        self._thread = threading.Thread(target=self._refresh, name=f"lease {self.what}", daemon=True)
        self._thread.start()

    def _try_acquire(self, final: bool) -> bool:
        """One attempt (two, after removing a stale lock). False when a live run holds it and `final` is not set."""
        for _ in range(2):
            if io.create_exclusive(self.uri, self._content(), self.opts):
                return True
            held = self._read()
            if held is not None and not _stale(held, self.owner["host"]):
                if not final:
                    return False
                left = max(0, held.expires - time.time())
                who = ("a damaged lock file" if held.damaged else f"host {held.host}, pid {held.pid}")
                raise LockedError(
                    f"output.uri: another run is writing {self.what} of this cache right now ({who}; lock "
                    f"{self.uri}). Wait for it to finish. If that run is dead, its lease expires within {left:.0f} s "
                    "and a new run then continues where it stopped."
                )
            log.warning("taking over the lock of %s from a dead run (%s)", self.what, held)
            io.remove(self.uri, self.opts)
        if not final:
            return False
        raise LockedError(f"output.uri: another run took the lock of {self.what} at the same moment ({self.uri}).")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                held = self._read()
                if held is None or held.token != self.owner["token"]:
                    self.lost = True
                    return
                io.write_text_atomic(self.uri, self._content(), self.opts)
            except Exception as e:  # a blip: the next refresh may succeed well within the lease
                log.warning("could not refresh the lock of %s: %s", self.what, e)

    def check(self) -> None:
        """Raise if the lease was lost (we looked dead to another run): stop before publishing anything more."""
        if self.lost:
            raise LockedError(f"output.uri: the lock of {self.what} was taken over by another run; stopping.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = self._read()
            if held is not None and held.token == self.owner["token"]:
                io.remove(self.uri, self.opts)
        except Exception as e:  # never hide the error that ended the run; the lease expires by itself
            _unreleased.add(self.owner["token"])
            log.warning("could not release the lock of %s (%s: %s); it expires in %.0f s",
                        self.what, type(e).__name__, e, LEASE_SECONDS)

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
