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
from typing import Any

from kd_core import io
from kd_core.errors import StorageError

log = logging.getLogger("kd_core.locks")

LEASE_SECONDS = 120.0  # a dead holder's lock is taken over after this long
REFRESH_SECONDS = LEASE_SECONDS / 4


# Tokens of locks this process held but could not remove (the target was down): a later run in this process
# may take them over at once, since their holder is known to be gone.
_unreleased: set[str] = set()


class LockedError(StorageError):
    """Another live run holds the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class LeaseLock:
    """`with LeaseLock(uri, what):` holds the lock at `uri` for the block, or raises LockedError at once."""

    def __init__(self, uri: str, what: str, storage_options: dict[str, Any] | None = None):
        self.uri, self.what, self.opts = uri, what, storage_options
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps({**self.owner, "what": self.what, "expires": time.time() + LEASE_SECONDS})

    def _read(self) -> dict[str, Any] | None:
        try:
            return io.read_json(self.uri, self.opts)
        except (FileNotFoundError, json.JSONDecodeError):  # released meanwhile, or caught mid-write
            return None

    def _stale(self, held: dict[str, Any]) -> bool:
        if held.get("expires", 0) < time.time() or held.get("token") in _unreleased:
            return True
        return held.get("host") == self.owner["host"] and not _pid_alive(int(held.get("pid", -1)))

    def acquire(self) -> None:
        for _ in range(2):  # a second try after removing a stale lock
            if io.create_exclusive(self.uri, self._content(), self.opts):
                break
            held = self._read()
            if held is not None and not self._stale(held):
                left = max(0, held["expires"] - time.time())
                raise LockedError(
                    f"output.uri: another run is writing {self.what} of this cache right now (host {held['host']}, "
                    f"pid {held['pid']}; lock {self.uri}). Wait for it to finish. If that run is dead, its lease "
                    f"expires within {left:.0f} s and a new run then continues where it stopped."
                )
            log.warning("taking over the lock of %s from a dead run (%s)", self.what, held)
            io.remove(self.uri, self.opts)
        else:
            raise LockedError(f"output.uri: another run took the lock of {self.what} at the same moment ({self.uri}).")
        self._thread = threading.Thread(target=self._refresh, name=f"lease {self.what}", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                held = self._read()
                if held is None or held.get("token") != self.owner["token"]:
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
            if held is not None and held.get("token") == self.owner["token"]:
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
