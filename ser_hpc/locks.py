"""Exclusive locks on shared-filesystem folders: one trainer per run folder, one launcher per grid.

Two processes writing one run folder interleave their metrics and trip over each other's
checkpoint temp folders; two launches of one grid submit the same packs twice. A lock here
is a small file, ``<folder>/.lock`` (runs) or ``results/<grid>/.launch.lock`` (launches),
that names its holder: host, pid, Slurm job id, start time and what it is doing.

Why a lock *file* with a heartbeat, and not ``fcntl``/``flock`` or ``filelock``:

- Results live on NFS, Lustre or GPFS, shared by the login node and every compute node.
  ``flock`` is local to one client on some of them (NFS before Linux 2.6.12, Lustre
  without ``-o flock``) and POSIX locks depend on a lock daemon that is often disabled;
  where they work, a node that dies holding one leaves it to the server's lease recovery.
  Creating a file is atomic everywhere: the file is built under a unique name and
  hard-linked to the lock name (``link`` fails if the name exists: the NFS-safe recipe of
  open(2), which also makes the holder's identity appear complete and at once); where hard
  links are not supported it falls back to ``O_CREAT|O_EXCL``.
- ``filelock.SoftFileLock`` is such a file too, but a holder that dies (SIGKILL, node
  failure, Slurm time limit) leaves it behind for ever. Here the holder refreshes the
  file's mtime from a daemon thread every ``heartbeat_s`` (30 s), and a lock is *stale*,
  and taken over, when:
    * its holder ran on this host and that pid is gone (or is another process now), or
    * its holder is an earlier incarnation of this very Slurm job (same job id, lower
      ``SLURM_RESTART_COUNT``: Slurm never runs two incarnations of a job at once), or
    * its heartbeat is older than ``stale_after_s`` (180 s).
  Ages are measured on the file server's clock (the mtime of a probe file created next to
  the lock), never against this node's clock, so clock skew between nodes does not matter;
  the lock file is opened before it is stat'ed, which revalidates NFS's cached attributes
  (close-to-open consistency).
- Taking over a stale lock, and releasing one, happen under a short-lived guard file
  (``<lock>.guard``, same create-exclusive rule), re-reading the lock under the guard: two
  processes that both find a lock stale cannot both take it, and a holder never removes a
  lock that someone else has taken over from it. A holder whose lock was taken over (it
  stalled for longer than ``stale_after_s``) logs that loudly and stops its heartbeat.

A lock is taken once, by the code that writes the folder: a run's by the trainer
(``train_pack``, whose ``wait`` argument is ``jobs/train.py --wait``), a grid's by the
launcher. Locks are not re-entrant: a second acquire of a held folder, in this process or
another, is refused like any other holder's (or waits, with ``wait``).

``SER_HPC_LOCK_HEARTBEAT_S`` and ``SER_HPC_LOCK_STALE_S`` change the two intervals (tests
shorten them).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from . import slurm

log = logging.getLogger("ser_hpc.locks")

RUN_LOCK = ".lock"
LAUNCH_LOCK = ".launch.lock"
GUARD_STALE_S = 30.0   # a guard is held for milliseconds; one this old belongs to a dead process


def heartbeat_interval() -> float:
    return float(os.environ.get("SER_HPC_LOCK_HEARTBEAT_S", 30))


def stale_after() -> float:
    return float(os.environ.get("SER_HPC_LOCK_STALE_S", 180))


class LockError(RuntimeError):
    """A lock could not be taken or kept."""


class LockHeld(LockError):
    """Another live process holds the lock; the message names it."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    if start is not None:
        now = _pid_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def identity(purpose: str) -> dict:
    """Who holds a lock: written into the lock file."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "slurm_job": slurm.job_id(), "slurm_restart": slurm.restart_count(),
            "user": os.environ.get("USER") or os.environ.get("LOGNAME"), "purpose": purpose,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "started_epoch": time.time(),
            "token": uuid.uuid4().hex}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown process (the lock file is unreadable)"
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("slurm_job"):
        parts.append(f"Slurm job {holder['slurm_job']}")
    if holder.get("user"):
        parts.append(f"user {holder['user']}")
    text = ", ".join(parts)
    if holder.get("started"):
        text += f", since {holder['started']}"
    if holder.get("purpose"):
        text += f" ({holder['purpose']})"
    return text


def _read(path: Path) -> tuple[dict | None, float | None]:
    """(holder record, mtime) of a lock file; (None, None) when there is none.

    The file is opened before it is stat'ed: on NFS the open revalidates cached attributes.
    An unparsable record is returned as {} (a lock file written by O_EXCL, still empty).
    """
    try:
        with open(path, "rb") as fh:
            mtime = os.fstat(fh.fileno()).st_mtime
            raw = fh.read()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(raw.decode("utf-8"))
        if not isinstance(holder, dict):
            holder = {}
    except (UnicodeDecodeError, ValueError):
        holder = {}
    return holder, mtime


def _fs_now(folder: Path) -> float:
    """The file server's clock: the mtime of a probe file created in ``folder``."""
    probe = folder / f".lock-probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _create_exclusive(path: Path, content: bytes) -> bool:
    """Create ``path`` holding ``content`` if no file has that name; True when we did."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, content)
        os.fsync(fd)
    except OSError:  # e.g. no space left: leave no temp file behind
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                return _create_excl_open(path, content)  # no hard links on this file system
            # NFS: the reply to a successful link can be lost; the link count tells.
            with contextlib.suppress(OSError):
                if os.stat(tmp).st_nlink == 2:
                    return True
            raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _create_excl_open(path: Path, content: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, content)
        os.fsync(fd)
    except OSError:  # an empty lock file would look held by nobody we can name
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return True


@contextlib.contextmanager
def _guard(lock_path: Path, timeout: float = 60.0) -> Iterator[None]:
    """A short critical section around takeover and release (see the module docstring)."""
    guard = lock_path.with_name(lock_path.name + ".guard")
    deadline = time.monotonic() + timeout
    while not _create_exclusive(guard, json.dumps(identity("guard")).encode()):
        _, mtime = _read(guard)
        if mtime is not None and _fs_now(guard.parent) - mtime > GUARD_STALE_S:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()  # left by a process that died inside the critical section
            continue
        if time.monotonic() > deadline:
            raise LockError(f"cannot take the guard {guard} (held for over {timeout:.0f} s); remove it if no "
                            "ser_hpc process is running")
        time.sleep(0.05)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


class FolderLock:
    """An exclusive lock on ``folder`` (file ``folder/name``); see the module docstring.

    ``acquire(wait=False)`` raises ``LockHeld`` at once when a live process holds it;
    ``wait=True`` (or a number of seconds) polls until it is free or stale.
    """

    def __init__(self, folder: str | Path, name: str = RUN_LOCK, purpose: str = "",
                 heartbeat_s: float | None = None, stale_after_s: float | None = None):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.purpose = purpose
        self.heartbeat_s = heartbeat_interval() if heartbeat_s is None else heartbeat_s
        self.stale_after_s = stale_after() if stale_after_s is None else stale_after_s
        self.record: dict | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- staleness ----------------------------------------------------------------------
    def stale_reason(self, holder: dict | None, mtime: float | None) -> str | None:
        """Why the current holder is dead, or None when it must be presumed alive."""
        if holder is None:
            return "no lock file"
        me = identity("")
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"], holder.get("pid_start")):
                return f"its holder (pid {holder['pid']} on this host) is no longer running"
        job = holder.get("slurm_job")
        if job and job == me["slurm_job"] and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]:
            return f"its holder was an earlier run of this Slurm job {job} (requeued since)"
        if mtime is not None:
            age = _fs_now(self.folder) - mtime
            if age > self.stale_after_s:
                return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def _held_message(self, holder: dict, mtime: float | None) -> str:
        age = f"; last heartbeat {max(0.0, _fs_now(self.folder) - mtime):.0f} s ago" if mtime else ""
        return (f"{self.path} is held by {describe_holder(holder)}{age}. "
                f"A holder that died is detected at once on its own host, otherwise once its heartbeat is older "
                f"than {self.stale_after_s:.0f} s; remove the file by hand only if you are sure that process is gone.")

    # ---- acquire / release --------------------------------------------------------------
    def acquire(self, wait: bool | float = False, poll_s: float | None = None) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = None if wait is True else (time.monotonic() + float(wait) if wait else time.monotonic())
        poll = poll_s if poll_s is not None else min(2.0, max(0.05, self.heartbeat_s / 4))
        announced = False
        while True:
            record = identity(self.purpose)
            if _create_exclusive(self.path, json.dumps(record, indent=1).encode()):
                break
            holder, mtime = _read(self.path)
            reason = self.stale_reason(holder, mtime)
            if reason == "no lock file":
                continue  # released meanwhile: try again at once
            if reason is not None and self._take_over(holder, reason):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise LockHeld(self._held_message(holder or {}, mtime), holder)
            if not announced:
                log.warning("waiting for %s: held by %s", self.path, describe_holder(holder or {}))
                announced = True
            time.sleep(poll)
        self.record, self.lost = record, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
        self._thread.start()
        return self

    def _take_over(self, holder: dict | None, reason: str) -> bool:
        """Remove a stale lock if it is still the one judged stale (checked under the guard)."""
        with _guard(self.path):
            now, mtime = _read(self.path)
            if now is None:
                return True
            if (now or {}).get("token") != (holder or {}).get("token") or self.stale_reason(now, mtime) is None:
                return False  # someone else took it over and is alive
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        log.warning("took over the stale lock %s of %s: %s", self.path, describe_holder(holder or {}), reason)
        return True

    def owned(self) -> bool:
        """True while the lock file still holds this holder's token."""
        holder, _ = _read(self.path)
        return bool(holder) and self.record is not None and holder.get("token") == self.record["token"]

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.owned():
                    self.lost = True
                    log.error("lost the lock %s: it was taken over after this process's heartbeat stalled for "
                              "more than %.0f s; another process may now write the same folder",
                              self.path, self.stale_after_s)
                    return
                os.utime(self.path)  # times=None: the file server's clock on NFS
            except OSError as exc:  # a blip of the shared file system; the next beat retries
                log.warning("lock heartbeat on %s failed: %s", self.path, exc)

    def release(self) -> None:
        if self.record is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            with _guard(self.path):
                if self.owned():
                    self.path.unlink()
        except (OSError, LockError) as exc:
            # No guard to be had (a full or read-only file system): our own lock file still goes,
            # or it would look held until its heartbeat goes stale.
            with contextlib.suppress(OSError):
                if self.owned():
                    self.path.unlink()
            log.warning("released the lock %s without its guard: %s", self.path, exc)
        self.record = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if self.record is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(run_dir: str | Path, purpose: str = "training") -> FolderLock:
    return FolderLock(run_dir, RUN_LOCK, purpose)


def launch_lock(grid_dir: str | Path, purpose: str = "launching the grid") -> FolderLock:
    return FolderLock(grid_dir, LAUNCH_LOCK, purpose)


@contextlib.contextmanager
def hold_run_folders(run_dirs: list[str | Path], wait: bool | float = False, enabled: bool = True,
                     purpose: str = "training") -> Iterator[list[FolderLock]]:
    """Lock every run folder of a pack (in a fixed order, so two packs cannot deadlock);
    on refusal the ones already taken are released and nothing was written. ``wait``: as
    ``FolderLock.acquire``. A folder named twice (two spellings of one path) is locked once."""
    locks: list[FolderLock] = []
    if not enabled:
        yield locks
        return
    folders: dict[str, str] = {}  # resolved path -> the folder as named
    for d in sorted({str(Path(d)) for d in run_dirs}):
        folders.setdefault(str(Path(d).resolve()), d)
    try:
        for _, d in sorted(folders.items()):
            lock = run_lock(d, purpose)
            try:
                lock.acquire(wait=wait)
            except LockHeld as exc:
                raise LockHeld(f"run folder {d} is in use: {exc}\n"
                               "Another process is training it (jobs/train.py, or a task of a launched grid). "
                               "Wait for it to finish (jobs/train.py --wait waits for the folder), or choose "
                               "another run.dir.", exc.holder) from None
            locks.append(lock)
        yield locks
    finally:
        for lock in reversed(locks):
            lock.release()
