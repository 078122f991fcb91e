"""Fixed-size descriptors between the orchestrator and its workers (struct framing over pipes).

Orchestrator -> worker: ``TASK`` = (task id, first row, row count, wait budget in us, 64-bit
member mask): rows of the shared input ring, how long the worker may hold them to fill a batch
without delaying the ensemble's answer (see ``dispatch.wait_budget``), and which of the worker's
members to run on them (bit k < ``MAX_GROUP_MEMBERS``: its k-th member; bit 63, ``BURST``: the task
is alone on its worker's cores, run it on the worker's burst sessions, which have an intra-op
thread per core; bit 62, ``WEIGHTED``: scale each member's term by its ensemble weight; the
``SPACE_BITS`` bits from ``SPACE_SHIFT``: the combiner's space, in which the worker turns each
member's output into the term it adds, ``enserve.combiners.member_terms``).
Worker -> orchestrator: a ``DONE`` header (with the worker's index), then ``n_ids`` uint32
task ids, then ``msg_len`` bytes of UTF-8 message (errors, or the load failure). Tasks whose rows
are no longer live (their request expired) are skipped unrun and reported as ``STATUS_CANCELLED``. All workers
share one completion pipe: a frame is at most ``PIPE_BUF`` bytes and is written on its own, so
each write is atomic and frames never interleave. No tensor ever crosses a pipe.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

TASK = struct.Struct("<IIIIQ")
MAX_GROUP_MEMBERS = 48  # bits 0-47 of a task's mask name the group's members it runs
SPACE_SHIFT, SPACE_BITS = 48, 8  # bits 48-55: the combiner's space (``enserve.combiners.SPACES``)
SPACE_MASK = ((1 << SPACE_BITS) - 1) << SPACE_SHIFT
WEIGHTED = 1 << 62  # in a task's mask: scale each member's term by its ensemble weight
BURST = 1 << 63  # in a task's mask: run on every core of the worker (nothing else is in flight)
COMBINE = WEIGHTED | SPACE_MASK  # what says how the members' outputs become terms
FLAGS = BURST | COMBINE


def combine_flags(space: int, weighted: bool) -> int:
    """A task's flags for a combiner in space number ``space`` (weighted or not); ValueError if the
    registry holds more spaces than ``SPACE_BITS`` can name."""
    if not 0 <= space < 1 << SPACE_BITS:
        raise ValueError(f"combiner space {space} does not fit a task's {SPACE_BITS} space bits")
    return (WEIGHTED if weighted else 0) | space << SPACE_SHIFT
DONE = struct.Struct("<IIIIIQQQQ")  # worker, status, n_ids, msg_len, rows, queue_ns, input_ns, infer_ns, output_ns
PIPE_BUF = 4096
MAX_MESSAGE = 1024
MAX_IDS_PER_FRAME = (PIPE_BUF - DONE.size - MAX_MESSAGE) // 4

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_READY = 2
STATUS_LOAD_FAILED = 3
STATUS_CANCELLED = 4  # tasks skipped unrun: their request was cancelled (its rows read not live)


class Task(NamedTuple):
    """Rows of one request for one worker to run: the orchestrator's record of a ``TASK`` it sent (the
    descriptor carries its rows and mask; the request and the range it holds stay here)."""

    rid: int  # its request
    start: int  # first row it runs
    count: int
    mask: int  # the group's members to run, and flags
    alloc: int  # first row of its request's range in the ring: what it holds until done


@dataclass
class Done:
    worker: int
    status: int
    ids: tuple[int, ...]
    message: str
    rows: int
    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


def pack_done(
    worker: int,
    status: int,
    ids: list[int] | tuple[int, ...] = (),
    message: str = "",
    rows: int = 0,
    times: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> list[bytes]:
    """Frames of at most PIPE_BUF bytes each, several when the ids do not fit in one (times go with
    the first). Write each with its own ``os.write``: only writes up to PIPE_BUF are atomic."""
    msg = message.encode()[:MAX_MESSAGE]
    frames = []
    for lo in range(0, max(1, len(ids)), MAX_IDS_PER_FRAME):
        chunk = ids[lo : lo + MAX_IDS_PER_FRAME]
        t = times if lo == 0 else (0, 0, 0, 0)
        r = rows if lo == 0 else 0
        frames.append(DONE.pack(worker, status, len(chunk), len(msg), r, *t) + struct.pack(f"<{len(chunk)}I", *chunk) + msg)
    return frames


def write_done(fd: int, frames: list[bytes]) -> None:
    for frame in frames:
        os.write(fd, frame)


class DoneReader:
    """Reassembles ``Done`` frames from arbitrary pipe chunks."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Done]:
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= DONE.size:
            worker, status, n_ids, msg_len, rows, q, i, f, o = DONE.unpack_from(self.buffer)
            end = DONE.size + 4 * n_ids + msg_len
            if len(self.buffer) < end:
                break
            ids = struct.unpack_from(f"<{n_ids}I", self.buffer, DONE.size)
            msg = bytes(self.buffer[DONE.size + 4 * n_ids : end]).decode(errors="replace")
            frames.append(Done(worker, status, ids, msg, rows, q, i, f, o))
            del self.buffer[:end]
        return frames


class TaskReader:
    """Reassembles ``TASK`` tuples from arbitrary pipe chunks."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, int, int, int, int]]:
        self.buffer += chunk
        n = len(self.buffer) // TASK.size
        tasks = list(TASK.iter_unpack(bytes(self.buffer[: n * TASK.size])))
        del self.buffer[: n * TASK.size]
        return tasks
