"""An in-flight request: its rows, the parts (tasks on worker groups) still to answer, their running
sums, and the one path that resolves its future. Plus one deadline timer for all requests.

Its state is written only by its own methods. Errors travel as exceptions: ``answer`` sets the
result or the exception, once. A request whose deadline passes is answered at once and gives back
its in-flight slot; its rows stay held by its tasks until each is done or skipped (``slots``), so
no later request can be given rows that a worker may still read for it, and the late completions
find no request and are dropped.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from enserve import combiners
from enserve.server.errors import DeadlineExceeded, EnserveError, Internal
from enserve.server.served.repository import ENTROPY_OUTPUT, MEMBERS_OUTPUT, VARIANCE_OUTPUT
from enserve.server.served.table import AnswerRecipe


class InflightRequest:
    __slots__ = ("rid", "recipe", "start", "count", "outstanding", "totals", "squares", "error", "future",
                 "t0", "t_submit", "retried", "timeout_s", "deadline", "uncertainty", "on_answer",
                 "members", "parts_in", "anytime", "used", "objective_s", "predicted_ns", "members_output")

    def __init__(self, rid: int, recipe: AnswerRecipe, start: int, count: int, parts: int,
                 future: asyncio.Future, now: float, timeout_s: float, uncertainty: bool = True,
                 members_output: bool = False) -> None:
        self.rid = rid
        self.recipe = recipe
        self.start = start
        self.count = count
        self.outstanding = parts
        self.totals: list[np.ndarray] | None = None
        self.squares: np.ndarray | None = None
        self.error: EnserveError | None = None
        self.future = future
        self.t0 = time.perf_counter_ns()
        self.t_submit = 0
        self.retried: set[int] = set()  # groups whose worker died while computing this request
        self.timeout_s = timeout_s
        self.deadline = now + timeout_s  # on the event loop's clock
        self.uncertainty = uncertainty  # compute the ensemble's entropy and variance outputs
        self.on_answer: Callable[[asyncio.Future], None] | None = None  # called at once, not a loop turn later
        self.members: tuple[str, ...] = ()  # the members of the front point it was given (``adaptive``)
        # with an objective: each part's (group's members, member mask, rows) in ``totals`` (``rows_done``)
        self.parts_in: list[tuple[tuple[str, ...], int, int]] = []
        self.anytime: frozenset[str] | None = None  # with an objective: the members an early answer needs
        self.used: tuple[str, ...] | None = None  # the members its answer combined (an ensemble's)
        self.objective_s: float | None = None  # its latency objective, when it has one
        self.predicted_ns = 0.0  # when the policy expected its point to be done (``adaptive``)
        self.members_output = members_output  # answer ``MEMBERS_OUTPUT`` (the caller asked for it)

    @property
    def answered(self) -> bool:
        return self.future.done()

    @property
    def complete(self) -> bool:
        return self.outstanding == 0

    def submitted(self) -> None:
        """Its tasks are handed out (the end of its share of the front's work, in its statistics)."""
        self.t_submit = time.perf_counter_ns()

    def when_answered(self, callback: Callable[[asyncio.Future], None]) -> None:
        """Call ``callback(future)`` inside ``answer``, not a loop turn later (the native front answers
        its call there); forgotten once called."""
        self.on_answer = callback

    def add_parts(self, n: int) -> None:
        """``n`` more tasks will answer for it (a part shared out over idle replicas)."""
        self.outstanding += n

    def retry(self, group: int) -> bool:
        """Whether a task of ``group`` whose worker died may be computed again: once per group."""
        if group in self.retried:
            return False
        self.retried.add(group)
        return True

    def fail(self, error: EnserveError) -> None:
        """It will be answered with ``error`` (the first one wins) once its parts are in."""
        if self.error is None:
            self.error = error

    def part_done(self, sums: list[np.ndarray], squares: np.ndarray, start: int, count: int,
                  names: tuple[str, ...] = (), mask: int = 0) -> None:
        """Add one part's sums (views into a group's shared slots) over its rows [start, start+count),
        all of this request's rows or a share of them that one replica ran; with ``names`` (its
        group's members), the members ``mask`` names there are noted as done for those rows (what
        an early answer needs: ``rows_done``)."""
        self.outstanding -= 1
        if self.error is not None or self.answered:
            return
        if names:
            self.parts_in.append((names, mask, count))
        if self.totals is None and count == self.count:  # the usual first part: all rows, one copy
            self.totals = [s[start : start + count].copy() for s in sums]
            self.squares = squares[start : start + count].copy()
            return
        if self.totals is None:
            self.totals = [np.zeros((self.count, *s.shape[1:]), s.dtype) for s in sums]
            self.squares = np.zeros((self.count, *squares.shape[1:]), squares.dtype)
        lo = start - self.start
        for acc, s in zip(self.totals, sums):
            acc[lo : lo + count] += s[start : start + count]
        self.squares[lo : lo + count] += squares[start : start + count]

    def part_failed(self, error: EnserveError) -> None:
        """One task will not answer this request; the first error is the one the caller gets."""
        self.outstanding -= 1
        self.fail(error)

    def answer(self) -> None:
        """Resolve the future with the combined outputs or the error (at most once)."""
        if self.answered:
            return
        if self.error is None:
            try:
                value = self._combine()
            except Exception as exc:  # never leave a caller waiting
                self.error = Internal(f"combining member outputs failed: {type(exc).__name__}: {exc}")
            else:
                self.future.set_result(value)
                self._answered()
                return
        self.future.set_exception(self.error)
        self.future.exception()  # retrieved: a caller that went away must not log it as lost
        self._answered()

    def _answered(self) -> None:
        self.totals = self.squares = None
        on_answer, self.on_answer = self.on_answer, None  # nothing it holds (a call's raw request) outlives it
        if on_answer is not None:
            on_answer(self.future)

    def expire(self) -> None:
        """The deadline passed: the caller gets DEADLINE_EXCEEDED now; the parts may still come back.
        A request with an objective (``anytime``) is answered instead with the members done by now,
        when they hold the front's first point and every row of each."""
        if self.answered:
            return
        rows_done = self.rows_done()
        done = self.finished_members(rows_done)
        if self.anytime is not None and self.error is None and done is not None and self.anytime <= set(done):
            self.used = done
            self.recipe = replace(self.recipe, weight_sum=self.recipe.weight_of(done))
            self.answer()
            return
        if self.anytime is not None and done is None:
            half = sorted(m for m, rows in rows_done.items() if rows != self.count)
            self.fail(DeadlineExceeded(
                f"request to model '{self.recipe.model}' was not done within its objective of "
                f"{self.objective_s * 1e3:g} ms, and no early answer could be made: members {half} had only "
                f"part of its {self.count} rows"))
        elif self.anytime is not None:
            have = "none" if not rows_done else ", ".join(sorted(rows_done))
            self.fail(DeadlineExceeded(
                f"request to model '{self.recipe.model}' could not reach the front's first point "
                f"({', '.join(sorted(self.anytime))}) within its objective of {self.objective_s * 1e3:g} ms "
                f"(members done: {have})"))
        else:
            self.fail(DeadlineExceeded(
                f"request to model '{self.recipe.model}' did not finish within {self.timeout_s:g} s"))
        self.answer()

    def rows_done(self) -> dict[str, int]:
        """Per member, the rows whose terms are in the sums (noted only under an objective)."""
        done: dict[str, int] = {}
        for names, mask, count in self.parts_in:
            for k, m in enumerate(names):
                if mask >> k & 1:
                    done[m] = done.get(m, 0) + count
        return done

    def finished_members(self, rows_done: dict[str, int] | None = None) -> tuple[str, ...] | None:
        """The members whose terms cover every row of the sums, in the point's order; None when some
        member's terms cover only part of the rows (a share of a split part is still out)."""
        rows_done = self.rows_done() if rows_done is None else rows_done
        if any(rows != self.count for rows in rows_done.values()):
            return None
        return tuple(m for m in self.members if m in rows_done)

    def _combine(self) -> dict[str, np.ndarray]:
        recipe = self.recipe
        if recipe.kind == "member":
            return {t.name: v for t, v in zip(recipe.outputs, self.totals)}
        if self.used is None:
            self.used = self.members
        combined, entropy, variance = combiners.answer(self.totals, self.squares, recipe.weight_sum, recipe.space,
                                                       [t.np_dtype for t in recipe.outputs], self.uncertainty)
        out = {t.name: v for t, v in zip(recipe.outputs, combined)}
        if self.uncertainty:
            out[ENTROPY_OUTPUT] = entropy
            out[VARIANCE_OUTPUT] = variance
        if self.members_output:
            used = set(self.used)
            mask = np.array([m in used for m, _ in recipe.weights])
            out[MEMBERS_OUTPUT] = np.repeat(mask[None], self.count, axis=0)
        return out


class Deadlines:
    """One timer for every request: a heap of deadlines, armed at the earliest; ``on_expire`` gets
    each request whose deadline passed unanswered. Answered requests leave lazily: ``answered``
    counts them, and the heap is rebuilt without them once they are half of it, so an answered
    request (and what it holds) is not kept until its own deadline."""

    COMPACT_AT = 64  # answered entries tolerated before a rebuild is considered

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[InflightRequest], None]) -> None:
        self.loop = loop
        self.on_expire = on_expire
        self.heap: list[tuple[float, int, InflightRequest]] = []
        self.order = itertools.count()
        self.timer: asyncio.TimerHandle | None = None
        self.armed_at = float("inf")
        self.stale = 0  # answered requests still in the heap

    def add(self, request: InflightRequest) -> None:
        self._trim()
        heapq.heappush(self.heap, (request.deadline, next(self.order), request))
        if request.deadline < self.armed_at:
            self._arm(request.deadline)

    def note_answered(self) -> None:
        """A request in the heap was answered before its deadline."""
        self.stale += 1
        if self.stale > self.COMPACT_AT and 2 * self.stale > len(self.heap):
            self.heap = [e for e in self.heap if not e[2].answered]
            heapq.heapify(self.heap)
            self.stale = 0

    def _trim(self) -> None:
        """Drop answered requests off the top."""
        heap = self.heap
        while heap and heap[0][2].answered:
            heapq.heappop(heap)
            self.stale = max(0, self.stale - 1)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = when
        self.timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer, self.armed_at = None, float("inf")
        now = self.loop.time()
        while self.heap and self.heap[0][0] <= now:
            _, _, request = heapq.heappop(self.heap)
            if request.answered:
                self.stale = max(0, self.stale - 1)
            else:
                self.on_expire(request)
        self._trim()
        if self.heap:
            self._arm(self.heap[0][0])

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.heap.clear()
        self.stale = 0
