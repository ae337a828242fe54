"""One run per folder: a lock on a training out folder or a reproduction's run folder.

``with RunLock(folder):`` holds ``folder/.reidkit.lock`` for the block, or raises
:class:`RunLockedError` at once, naming the folder and the process that holds it (pid, host, start
time, command). Two jobs on one folder (a SLURM job requeued while the old one still runs) would
otherwise interleave ``train.log`` and overwrite each other's checkpoints.

* POSIX: ``fcntl.flock`` on the lock file. The kernel releases it when the holder dies, so a lock
  left by a crash (even ``kill -9``) is stale by construction and the next run takes it.
* Elsewhere (no ``fcntl``): the file is created with ``O_EXCL``; a file whose pid no longer runs
  on this host is stale and is replaced. A holder on another host is trusted.

The lock is per folder: a run folder and a subfolder of it (the notebooks train into
``RUN_DIR/<notebook>/<variant>``) are locked independently. It is not re-entrant: a second
``RunLock`` on a held folder fails even in the same process.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the O_EXCL lock file
    fcntl = None

LOCK_NAME = ".reidkit.lock"

#: how long a refused run waits for the holder's details to appear in a just-created lock file
_READ_WAIT_S = 1.0


class RunLockedError(RuntimeError):
    """The folder is held by another run (the message names the folder and the holder)."""


def holder_info(command: str | None = None) -> dict:
    """What a lock file records about this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command if command is not None else shlex.join([sys.executable, *sys.argv])}


def read_holder(path: Path) -> dict:
    """The holder recorded in a lock file; ``{}`` when it is missing, empty or unreadable."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict) -> str:
    """``pid 123 on host h, started T, command C`` (what is known of it)."""
    if not info:
        return "an unknown process (its lock file records no details)"
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("command"):
        parts.append(f"command: {' '.join(str(info['command']).split())[:200]}")
    return ", ".join(parts)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_stale(info: dict) -> bool:
    """An O_EXCL lock file is stale when its pid no longer runs on this host (or it records none)."""
    if not info or "pid" not in info:
        return True
    if info.get("host") != socket.gethostname():
        return False
    try:
        return not pid_alive(int(info["pid"]))
    except (TypeError, ValueError):
        return True


class RunLock:
    """``with RunLock(folder, command=None):`` (see the module docstring). ``use_flock=False``
    forces the O_EXCL lock file (what a platform without ``fcntl`` uses)."""

    def __init__(self, folder: str | Path, command: str | None = None, use_flock: bool | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.use_flock = fcntl is not None if use_flock is None else bool(use_flock and fcntl is not None)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock (creating the folder) or raise :class:`RunLockedError` at once."""
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = self._take_flock() if self.use_flock else self._take_exclusive()
        payload = json.dumps(holder_info(self.command)).encode()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, payload)
        return self

    def release(self) -> None:
        """Remove the lock file and let go of it (a no-op when not held)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            self.path.unlink()  # while still held: a waiter then retries on a fresh file
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse(self, info: dict) -> RunLockedError:
        return RunLockedError(f"{self.folder} is in use by another run: {describe_holder(info)} (lock file "
                              f"{self.path}); wait for that run to end or stop it, or use another folder")

    def _holder_when_refused(self) -> dict:
        """The holder's details, waiting briefly for a holder that has just created the file."""
        deadline = time.monotonic() + _READ_WAIT_S
        info = read_holder(self.path)
        while not info and time.monotonic() < deadline:
            time.sleep(0.05)
            info = read_holder(self.path)
        return info

    def _take_flock(self) -> int:
        """flock the lock file without waiting; retried when the file was removed or replaced between
        our open and our lock (its holder was releasing it)."""
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._holder_when_refused()) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise RunLockedError(f"{self.folder}: could not take {self.path} (it kept being replaced)")

    def _take_exclusive(self) -> int:
        """Create the lock file with O_EXCL; a stale one (its pid gone from this host) is replaced."""
        for _ in range(100):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self._holder_when_refused()
                if not is_stale(info):
                    raise self._refuse(info) from None
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        raise RunLockedError(f"{self.folder}: could not take {self.path} (it kept being replaced)")
