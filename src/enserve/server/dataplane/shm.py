"""POSIX shared memory: our own arenas and client-registered regions.

Every object the daemon creates is named ``/enserve.<pid>.<run id>.<purpose>``. The run id is new
for every claim, and a claim is an ``flock``ed lock object, ``/enserve.<pid>.<run id>.lock``, held
while the process has objects: a restarted container's PID 1 never meets its predecessor's names,
and cleanup removes only objects whose lock nobody holds (so never a live daemon's, whatever pid
namespace it runs in). Objects are reserved with ``posix_fallocate`` when created: a full /dev/shm
is an error at start-up, never a SIGBUS later.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import pwd
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import posix_ipc

from enserve.server.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted

PREFIX = "enserve."
SHM_DIR = Path("/dev/shm")
LOCK = "lock"


class SharedMemoryError(ResourceExhausted):
    """Shared memory that cannot be created as asked (no room in /dev/shm, no permission)."""


class OwnerLock:
    """This process's claim: a run id and its flocked lock object, taken with the first arena and
    given back (lock unlinked) when the last one closes."""

    def __init__(self) -> None:
        self.run: str | None = None
        self.fd = -1
        self.arenas = 0
        self.bytes = 0  # reserved by this process's live arenas

    def prefix(self) -> str:
        if self.run is None:
            self._claim()
        return f"{PREFIX}{os.getpid()}.{self.run}."

    def _claim(self) -> None:
        while True:
            run = secrets.token_hex(6)
            name = f"/{PREFIX}{os.getpid()}.{run}.{LOCK}"
            shm = _open(name, posix_ipc.O_CREX, 0, "the owner lock")
            fcntl.flock(shm.fd, fcntl.LOCK_EX)
            if os.fstat(shm.fd).st_nlink > 0:  # a cleaner may have unlinked it before our flock
                self.run, self.fd = run, shm.fd
                return
            shm.close_fd()

    def acquire(self, size: int) -> None:
        self.arenas += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.arenas -= 1
        self.bytes -= size
        if self.arenas == 0 and self.run is not None:
            unlink_quietly(f"/{PREFIX}{os.getpid()}.{self.run}.{LOCK}")
            os.close(self.fd)
            self.run, self.fd = None, -1


OWNER = OwnerLock()


def _open(name: str, flags: int, size: int, what: str) -> posix_ipc.SharedMemory:
    try:
        return posix_ipc.SharedMemory(name, flags, size=size)
    except posix_ipc.ExistentialError as exc:
        raise SharedMemoryError(f"shared memory {what} '{name}': {exc}") from exc
    except (posix_ipc.PermissionsError, OSError) as exc:
        raise SharedMemoryError(f"cannot open shared memory {what} '{name}': {exc}; is /dev/shm mounted and "
                                "writable?") from exc


def shm_free_bytes() -> int:
    """Bytes free in /dev/shm (0 where there is none)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class Arena:
    """A named shared-memory block mapped into this process; the creator reserves and unlinks it."""

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        shm = _open(name, posix_ipc.O_CREX if create else 0, 0, "object")
        try:
            if create:
                try:
                    os.posix_fallocate(shm.fd, 0, size)
                except OSError as exc:
                    shm.close_fd()
                    unlink_quietly(name)
                    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                        raise SharedMemoryError(
                            f"/dev/shm has no room for {size / 2**20:.1f} MiB more ({shm_free_bytes() / 2**20:.1f} "
                            f"MiB free); lower --shm-budget, or give the container a larger /dev/shm (docker "
                            f"--shm-size, a Kubernetes emptyDir with medium: Memory)") from exc
                    raise SharedMemoryError(f"cannot reserve {size} bytes of shared memory for '{name}': "
                                            f"{exc.strerror or exc}") from exc
            self.size = os.fstat(shm.fd).st_size
            self.map = mmap.mmap(shm.fd, self.size)
        finally:
            if shm.fd >= 0:
                shm.close_fd()
        self.name = name
        self.owner = create

    @classmethod
    def create(cls, purpose: str, size: int) -> Arena:
        """A new object of ``size`` bytes (reserved) named for this process's run."""
        name = "/" + OWNER.prefix() + purpose
        OWNER.acquire(size)
        try:
            return cls(name, size, create=True)
        except BaseException:
            OWNER.release(size)
            raise

    def array(self, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self.map, offset=offset)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a numpy view is still alive; the mapping goes with the process
        if self.owner:
            self.owner = False
            unlink_quietly(self.name)
            OWNER.release(self.size)


def unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def ours(owner_pid: int | None = None) -> list[str]:
    """Names of enserve objects in /dev/shm (of one daemon pid, or all)."""
    if not SHM_DIR.is_dir():
        return []
    names = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX)]
    if owner_pid is not None:
        names = [n for n in names if n.split(".")[1] == str(owner_pid)]
    return names


def _owner_gone(run: str) -> bool:
    """Whether nobody holds the lock of ``run`` (``<pid>.<run id>``); a missing lock counts as gone."""
    try:
        shm = posix_ipc.SharedMemory(f"/{PREFIX}{run}.{LOCK}")
    except posix_ipc.ExistentialError:
        return True
    try:
        fcntl.flock(shm.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        shm.close_fd()  # closing drops the lock we may have taken
    return True


def user(uid: int) -> str:
    """'name (uid N)', or 'uid N' for a user without a name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def owner_of(name: str) -> str:
    """The user who owns /dev/shm/``name``."""
    try:
        return user((SHM_DIR / name).stat().st_uid)
    except OSError:
        return "an unknown user"


def clean_leftovers(report: Callable[[str], None] | None = None) -> list[str]:
    """Unlink objects of enserve runs whose owner lock is free (their process is gone, in any pid
    namespace); return their names. Objects of live daemons are never touched, nor those of another
    user this process may not open or remove: ``report`` hears which, and whose, and the start goes on."""
    runs: dict[str, list[str]] = {}
    for name in ours():
        parts = name.split(".")
        runs.setdefault(".".join(parts[1:3]), []).append(name)
    removed = []
    for run, names in runs.items():
        if OWNER.run is not None and run == f"{os.getpid()}.{OWNER.run}":
            continue
        lock = f"{PREFIX}{run}.{LOCK}"
        gone: list[str] = []
        try:
            if not _owner_gone(run):
                continue
            for name in sorted(names, key=lambda n: n == lock):  # the lock last
                unlink_quietly("/" + name)
                gone.append(name)
        except (posix_ipc.PermissionsError, PermissionError) as exc:
            left = [n for n in names if n not in gone]
            if report is not None and left:
                report(f"shared memory: leaving {SHM_DIR}/{lock if lock in left else left[0]} "
                       f"({len(left)} objects of run {run}) alone: it belongs to {owner_of(left[0])} and this "
                       f"daemon runs as {user(os.geteuid())}, so it may not check or remove it ({exc}); its names "
                       "never clash with this daemon's")
        finally:
            removed += gone
    return removed


@dataclass
class ClientRegion:
    """A client's registered window, read and written through its descriptor (``preadv`` /
    ``pwrite``), never mapped: a client that shrinks its object gets an error, not the daemon a SIGBUS."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int

    def _window(self, offset: int, byte_size: int, what: str) -> int:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"{what}: shared memory offset {offset} + byte size {byte_size} exceeds region "
                f"'{self.name}' of {self.byte_size} bytes"
            )
        return self.offset + offset

    def _shrunk(self, what: str, position: int, byte_size: int, size: int) -> InvalidArgument:
        return InvalidArgument(f"{what}: shared memory region '{self.name}' (key '{self.key}') is now {size} bytes, "
                               f"too small for {byte_size} bytes at {position}: the client has shrunk it")

    def read(self, offset: int, byte_size: int, what: str) -> bytearray:
        """A copy of bytes [offset, offset+byte_size) of the window."""
        position = self._window(offset, byte_size, what)
        out = bytearray(byte_size)
        got = os.preadv(self.fd, [out], position) if byte_size else 0
        if got != byte_size:
            raise self._shrunk(what, position, byte_size, os.fstat(self.fd).st_size)
        return out

    def check(self, offset: int, byte_size: int, what: str) -> None:
        """Whether the window can take ``byte_size`` bytes at ``offset`` (and the object still holds them)."""
        position = self._window(offset, byte_size, what)
        size = os.fstat(self.fd).st_size
        if position + byte_size > size:
            raise self._shrunk(what, position, byte_size, size)

    def write(self, offset: int, data: memoryview, what: str) -> None:
        self.check(offset, data.nbytes, what)
        position, done = self.offset + offset, 0
        while done < data.nbytes:
            done += os.pwrite(self.fd, data[done:], position + done)


class ClientRegions:
    """System shared-memory regions registered by clients (Triton's shared-memory extension)."""

    def __init__(self) -> None:
        self.regions: dict[str, ClientRegion] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if name in self.regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered")
        if not name:
            raise InvalidArgument("shared memory region name is empty")
        if offset < 0 or byte_size <= 0:
            raise InvalidArgument(
                f"shared memory region '{name}': offset {offset} and byte_size {byte_size} must be >= 0 and > 0"
            )
        norm = "/" + key.lstrip("/")
        if norm.lstrip("/").startswith(PREFIX):
            raise InvalidArgument(f"shared memory key '{key}' belongs to the server and cannot be registered")
        try:
            shm = posix_ipc.SharedMemory(norm)
        except posix_ipc.ExistentialError as exc:
            raise NotFound(f"unable to open shared memory region '{name}': key '{key}' does not exist") from exc
        except (posix_ipc.PermissionsError, ValueError) as exc:
            raise InvalidArgument(f"unable to open shared memory key '{key}': {exc}") from exc
        except OSError as exc:  # a symlink (ELOOP), too many open files (EMFILE), ...
            raise InvalidArgument(f"unable to open shared memory key '{key}': {exc.strerror or exc}") from exc
        total = os.fstat(shm.fd).st_size
        if offset + byte_size > total:
            shm.close_fd()
            raise InvalidArgument(
                f"shared memory region '{name}': offset {offset} + byte_size {byte_size} exceeds "
                f"the size {total} of key '{key}'"
            )
        self.regions[name] = ClientRegion(name, key, offset, byte_size, shm.fd)

    def get(self, name: str) -> ClientRegion:
        try:
            return self.regions[name]
        except KeyError:
            raise NotFound(f"shared memory region '{name}' is not registered") from None

    def unregister(self, name: str | None = None) -> None:
        """Unregister one region (or all). Unknown names are not an error, as in Triton."""
        names = [name] if name else list(self.regions)
        for n in names:
            region = self.regions.pop(n, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str | None = None) -> list[ClientRegion]:
        if name:
            return [self.get(name)]
        return list(self.regions.values())

    def close(self) -> None:
        self.unregister()
