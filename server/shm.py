"""POSIX shared memory: our own arenas (named after the daemon's pid) and client-registered regions."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import posix_ipc

from enserve.server.errors import AlreadyExists, InvalidArgument, NotFound

PREFIX = "enserve."
SHM_DIR = Path("/dev/shm")


def arena_name(owner_pid: int, purpose: str) -> str:
    return f"/{PREFIX}{owner_pid}.{purpose}"


class Arena:
    """A named shared-memory block mapped into this process; the creator unlinks it."""

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(name, flags, size=size if create else 0)
        try:
            self.size = shm.size
            self.map = mmap.mmap(shm.fd, self.size)
        finally:
            shm.close_fd()
        self.name = name
        self.owner = create

    def array(self, dtype: np.dtype, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self.map, offset=offset)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a numpy view is still alive; the mapping goes with the process
        if self.owner:
            unlink_quietly(self.name)


def unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ours(owner_pid: int | None = None) -> list[str]:
    """Names of enserve objects in /dev/shm (of one daemon pid, or all)."""
    if not SHM_DIR.is_dir():
        return []
    names = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX)]
    if owner_pid is not None:
        names = [n for n in names if n.split(".")[1] == str(owner_pid)]
    return names


def clean_leftovers() -> list[str]:
    """Unlink objects left by enserve daemons that are no longer running; return their names."""
    removed = []
    for name in ours():
        pid = name.split(".")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            unlink_quietly("/" + name)
            removed.append(name)
    return removed


@dataclass
class ClientRegion:
    name: str
    key: str
    offset: int
    byte_size: int
    map: mmap.mmap

    def view(self, offset: int, byte_size: int, what: str) -> memoryview:
        """Bytes [offset, offset+byte_size) of the registered window; a precise error if out of it."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidArgument(
                f"{what}: shared memory offset {offset} + byte size {byte_size} exceeds region "
                f"'{self.name}' of {self.byte_size} bytes"
            )
        start = self.offset + offset
        return memoryview(self.map)[start : start + byte_size]


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
        try:
            total = shm.size
            if offset + byte_size > total:
                raise InvalidArgument(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} exceeds "
                    f"the size {total} of key '{key}'"
                )
            region_map = mmap.mmap(shm.fd, total)
        finally:
            shm.close_fd()
        self.regions[name] = ClientRegion(name, key, offset, byte_size, region_map)

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
                try:
                    region.map.close()
                except BufferError:
                    pass  # an in-flight request still reads it; freed when that view dies

    def status(self, name: str | None = None) -> list[ClientRegion]:
        if name:
            return [self.get(name)]
        return list(self.regions.values())

    def close(self) -> None:
        self.unregister()
