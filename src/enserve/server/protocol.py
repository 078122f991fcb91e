"""Fixed-size descriptors between the orchestrator and its workers (struct framing over pipes).

Orchestrator -> worker: ``TASK`` = (task id, first row, row count, wait budget in us, member
mask): rows of the shared input ring, how long the worker may hold them to fill a batch without
delaying the ensemble's answer (see ``dispatch.wait_budget``), and which of the worker's members
to run on them (bit k: its k-th member; bit 31, ``BURST``: the task is alone on its worker's cores,
run it on the worker's burst sessions, which have an intra-op thread per core; bit 30,
``WEIGHTED``: scale each member's term by its ensemble weight; bits 28-29: the combiner's space, in
which the worker turns each member's output into the term it adds, ``enserve.combiners.term``).
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

TASK = struct.Struct("<IIIII")
BURST = 1 << 31  # in a task's mask: run on every core of the worker (nothing else is in flight)
WEIGHTED = 1 << 30  # in a task's mask: scale each member's term by its ensemble weight
SPACE_SHIFT = 28  # bits 28-29: the combiner's space (``enserve.combiners.SPACES``) the terms are in
SPACE_MASK = 3 << SPACE_SHIFT
COMBINE = WEIGHTED | SPACE_MASK  # what says how the members' outputs become terms
FLAGS = BURST | COMBINE
MAX_GROUP_MEMBERS = 28  # a task names its members in a 32-bit mask whose top four bits are flags
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
