"""The data plane's pure parts with exact answers: combiner, request resolution, deadlines,
replica choice, placement resolution."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from enserve.server.config import ServeOptions
from enserve.server.dataplane.dispatch import hung_for, least_loaded, shares, split_members
from enserve.server.dataplane.request import Deadlines, InflightRequest
from enserve.server.dataplane.supervisor import WorkerState
from enserve.server.errors import DeadlineExceeded, Internal, RepositoryError, Unavailable
from enserve.server.protocol import BURST, WEIGHTED
from enserve.server.served.placement import (
    Placement,
    Replica,
    WorkerGroup,
    check,
    from_config,
    with_flags,
)
from enserve.server.served.repository import MemberSpec, Repository, TensorSpec
from enserve.server.served.table import AnswerRecipe

PROBS = TensorSpec("probs", "FP32", (2,))


def _request(loop, parts: int, kind: str = "ensemble", members: int = 2, timeout: float = 60.0) -> InflightRequest:
    return InflightRequest(7, AnswerRecipe("ens", kind, (PROBS,), members, 0), start=1, count=2, parts=parts,
                           future=loop.create_future(), now=loop.time(), timeout_s=timeout)


def test_request_adds_its_parts_rows_and_resolves_once():
    loop = asyncio.new_event_loop()
    try:
        sums = np.zeros((4, 2), np.float32)
        squares = np.zeros((4, 2), np.float32)
        sums[1:3] = [[0.5, 0.5], [1.0, 0.0]]  # group 1 ran one member on rows 1-2
        squares[1:3] = sums[1:3] ** 2
        r = _request(loop, parts=2)
        r.part_done([sums], squares, 1, 2)
        assert not r.complete and not r.answered
        sums[1:3] = [[0.1, 0.9], [0.0, 1.0]]  # group 2, the same rows reused for its own slot
        squares[1:3] = sums[1:3] ** 2
        sums[0] = sums[3] = 99  # other requests' rows are not read
        r.part_done([sums], squares, 1, 2)
        assert r.complete
        r.answer()
        out = r.future.result()
        np.testing.assert_allclose(out["probs"], [[0.3, 0.7], [0.5, 0.5]], rtol=1e-6)
        np.testing.assert_allclose(out["member_variance"][:, 0], [0.04, 0.25], rtol=1e-5)
        r.answer()  # a second answer changes nothing
        assert r.future.result() is out
    finally:
        loop.close()


def test_a_request_split_over_replicas_adds_each_share_at_its_rows():
    loop = asyncio.new_event_loop()
    try:
        r = InflightRequest(3, AnswerRecipe("m", "member", (PROBS,), 1, 0), start=2, count=3, parts=2,
                            future=loop.create_future(), now=loop.time(), timeout_s=60.0)
        slot = np.full((8, 2), -1.0, np.float32)
        slot[2:4] = [[1, 2], [3, 4]]  # replica A ran rows 2-3
        r.part_done([slot], np.zeros((8, 2), np.float32), 2, 2)
        slot[2:4] = 99  # rows reused: A's share was already taken
        slot[4] = [5, 6]  # replica B ran row 4
        r.part_done([slot], np.zeros((8, 2), np.float32), 4, 1)
        r.answer()
        np.testing.assert_array_equal(r.future.result()["probs"], [[1, 2], [3, 4], [5, 6]])
    finally:
        loop.close()


def test_uncertainty_outputs_only_when_asked_and_the_answer_callback_runs_at_once():
    loop = asyncio.new_event_loop()
    try:
        r = InflightRequest(4, AnswerRecipe("ensemble", "ensemble", (PROBS,), 2, 0), start=0, count=1, parts=1,
                            future=loop.create_future(), now=loop.time(), timeout_s=60.0, uncertainty=False)
        seen = []
        r.on_answer = seen.append
        r.part_done([np.array([[1.0, 1.0]], np.float32)], np.array([[0.5, 0.5]], np.float32), 0, 1)
        r.answer()
        assert seen == [r.future]  # called inside answer(), not scheduled on the loop
        assert list(r.future.result()) == ["probs"]
        np.testing.assert_allclose(r.future.result()["probs"], [[0.5, 0.5]])
    finally:
        loop.close()


def test_request_failure_and_expiry_resolve_with_exceptions():
    loop = asyncio.new_event_loop()
    try:
        r = _request(loop, parts=2)
        r.part_failed(Internal("member 'a' failed"))
        r.part_done([np.ones((4, 2), np.float32)], np.ones((4, 2), np.float32), 1, 2)  # ignored after a failure
        assert r.complete
        r.answer()
        with pytest.raises(Internal, match="member 'a' failed"):
            r.future.result()
        late = _request(loop, parts=1, timeout=0.5)
        late.expire()
        with pytest.raises(DeadlineExceeded, match="did not finish within 0.5 s"):
            late.future.result()
        late.part_done([np.ones((4, 2), np.float32)], np.ones((4, 2), np.float32), 1, 2)  # rows come back later
        assert late.complete and late.totals is None
        member = _request(loop, parts=1, kind="member", members=1)
        member.part_done([np.arange(8, dtype=np.float32).reshape(4, 2)], np.zeros((4, 2), np.float32), 1, 2)
        member.answer()
        np.testing.assert_array_equal(member.future.result()["probs"], [[2, 3], [4, 5]])
        assert set(member.future.result()) == {"probs"}
    finally:
        loop.close()


def test_one_timer_expires_requests_in_deadline_order():
    async def scenario():
        loop = asyncio.get_running_loop()
        expired: list = []

        def on_expire(request):
            expired.append(request)
            request.expire()

        deadlines = Deadlines(loop, on_expire)
        slow, fast, done = (_request(loop, parts=1, timeout=t) for t in (0.3, 0.05, 0.1))
        for r in (slow, fast, done):
            deadlines.add(r)
        done.part_failed(Unavailable("answered before its deadline"))
        done.answer()
        await asyncio.sleep(0.15)
        assert fast.answered and isinstance(fast.error, DeadlineExceeded)
        assert isinstance(done.error, Unavailable) and not slow.answered
        await asyncio.sleep(0.25)
        assert isinstance(slow.error, DeadlineExceeded)
        assert expired == [fast, slow]  # in deadline order; the answered one is never handed over
        assert deadlines.heap == [] and deadlines.timer is None
        deadlines.close()

    asyncio.run(scenario())


def test_a_worker_is_hung_when_it_owes_an_answer_and_has_been_silent_beyond_the_limit():
    from enserve.server.dataplane.dispatch import Dispatch

    assert hung_for(None, 100.0, 5.0) is None  # nothing in flight
    assert hung_for(98.0, 100.0, 5.0) is None
    assert hung_for(90.0, 100.0, 5.0) == 10.0
    assert hung_for(95.0, 100.0, 5.0) is None  # exactly at the limit is not beyond it
    w = SimpleNamespace(sent_at={}, heard_at=0.0)
    assert Dispatch.waiting_since(w) is None
    w.sent_at = {1: 90.0, 2: 99.0}
    assert Dispatch.waiting_since(w) == 90.0  # silent since its oldest task
    w.heard_at = 96.0  # it answered something since: it works through its queue
    assert Dispatch.waiting_since(w) == 96.0


def test_least_loaded_ready_replica():
    ws = [SimpleNamespace(state=WorkerState.READY, rows=5), SimpleNamespace(state=WorkerState.STARTING, rows=0),
          SimpleNamespace(state=WorkerState.READY, rows=2), SimpleNamespace(state=WorkerState.READY, rows=2)]
    assert least_loaded(ws) is ws[2]  # fewest rows; the first of equals; not one still starting
    assert least_loaded([SimpleNamespace(state=WorkerState.DOWN, rows=0)]) is None


def test_split_members_deals_the_longest_first_to_the_lightest_share():
    costs = [1.0, 2.0, 3.0, 8.0]
    assert split_members(costs, 0b1111, 2) == [0b1000, 0b0111]  # 8 | 3+2+1
    assert split_members(costs, 0b1111, 3) == [0b1000, 0b0100, 0b0011]  # 8 | 3 | 2+1
    assert split_members(costs, 0b0111, 2) == [0b0100, 0b0011]  # only the masked members: 3 | 2+1
    assert split_members(costs, 0b0011, 5) == [0b0010, 0b0001]  # never more shares than members
    assert split_members([2.0, 2.0, 2.0, 2.0], 0b1111, 2) == [0b0101, 0b1010]  # ties: the earlier share
    assert split_members(costs, 0b1111, 1) == [0b1111]
    with pytest.raises(ValueError, match="shares is 0, but must be >= 1"):
        split_members(costs, 0b1111, 0)


def test_shares_split_rows_or_one_rows_members_over_idle_replicas():
    costs = [1.0, 2.0, 3.0, 8.0]
    assert shares(10, 5, 1, costs, 0b1111 | BURST, True) == [(10, 5, 0b1111 | BURST)]  # one idle replica: whole
    assert shares(10, 5, 2, costs, 0b1111 | BURST, True) == [(10, 2, 0b1111), (12, 3, 0b1111)]  # rows, no burst
    assert shares(10, 2, 3, costs, 0b1111, False) == [(10, 1, 0b1111), (11, 1, 0b1111)]  # at most a row each
    assert shares(10, 1, 2, costs, 0b1111 | BURST, True) == [(10, 1, 0b1000 | BURST), (10, 1, 0b0111)]  # members
    assert shares(10, 1, 2, costs, 0b1111, True) == [(10, 1, 0b1000), (10, 1, 0b0111)]  # alone, other groups too
    assert shares(10, 1, 2, (), 0b1111 | BURST, True) == [(10, 1, 0b1111 | BURST)]  # costs not measured yet: whole
    assert shares(10, 1, 2, costs, 0b1111, False) == [(10, 1, 0b1111)]  # not alone in the server: whole
    W = WEIGHTED  # a weighted ensemble's flag stays on every share
    assert shares(10, 1, 2, costs, 0b1111 | W | BURST, True) == [(10, 1, 0b1000 | W | BURST), (10, 1, 0b0111 | W)]
    assert shares(10, 5, 2, costs, 0b1111 | W | BURST, True) == [(10, 2, 0b1111 | W), (12, 3, 0b1111 | W)]


def _repo(*specs: MemberSpec) -> Repository:
    return Repository(Path("."), {s.name: s for s in specs})


def _member(name: str, **kw) -> MemberSpec:
    return MemberSpec(name, Path(f"{name}.onnx"), [TensorSpec("x", "FP32", (3,))], [PROBS], 64, **kw)


def test_placement_from_config_replicas_groups_and_fair_threads(monkeypatch):
    monkeypatch.setattr("enserve.server.served.placement._all_cores", lambda: (0, 1, 2, 3))
    repo = _repo(_member("a", devices=("cpu", "cpu"), batch_size=8), _member("b", worker_group="g"),
                 _member("c", worker_group="g", batch_size=4, queue_delay_us=100),
                 _member("d", devices=("gpu:1",), cpu_cores=(2, 3)))
    p = from_config(repo)
    # 3 CPU replicas share cores 0-3: one thread each (4 // 3); the GPU replica has no cores
    assert p.groups == (
        WorkerGroup(("a",), (Replica("cpu", (0, 1, 2, 3), 1), Replica("cpu", (0, 1, 2, 3), 1)), 8, 0),
        WorkerGroup(("b", "c"), (Replica("cpu", (0, 1, 2, 3), 1),), 4, 100),
        WorkerGroup(("d",), (Replica("gpu:1", (), 1),), 32, 0),
    )
    forced = with_flags(p, ServeOptions(model_repository=Path("."), device="cpu", cpu_cores=(0, 1), batch_size=16))
    assert {r for g in forced.groups for r in g.replicas} == {Replica("cpu", (0, 1), 1)}
    assert {g.batch_size for g in forced.groups} == {16}
    threads = with_flags(p, ServeOptions(model_repository=Path("."), threads_per_member=3))
    assert {r.threads for g in threads.groups for r in g.replicas} == {3}
    bad = dataclasses.replace(repo.members["c"], devices=("gpu:0",))
    with pytest.raises(RepositoryError, match="worker group 'g': member 'c' has instances"):
        from_config(_repo(repo.members["b"], bad))
    with pytest.raises(RepositoryError, match="members \\['a'\\] are placed in two worker groups"):
        check(Placement((WorkerGroup(("a",), (Replica("cpu", (0,), 1),), 8),
                         WorkerGroup(("a", "b"), (Replica("cpu", (0,), 1),), 8))))
    with pytest.raises(RepositoryError, match="has 0 threads, but must have >= 1"):
        check(Placement((WorkerGroup(("a",), (Replica("cpu", (0,), 0),), 8),)))


def test_recent_load_lets_one_client_burst_but_not_a_lone_request_among_four():
    from enserve.server.dataplane.dispatch import QUIET_LOAD, recent_load

    assert recent_load(1.0, 3) == pytest.approx(1.2) and recent_load(2.0, 2) == 2.0
    load = 1.0
    for _ in range(100):  # one client in a closed loop: every arrival finds only itself
        load = recent_load(load, 1)
    assert load == 1.0 < QUIET_LOAD
    for in_flight in [4, 3, 4, 2, 4, 3] * 5:  # four clients: arrivals find 2-4 requests
        load = recent_load(load, in_flight)
    assert load > 2.5
    load = recent_load(load, 1)  # one arrival finds the server empty between answers
    assert load > QUIET_LOAD
    for _ in range(20):  # back to one client: bursting again within about 20 requests
        load = recent_load(load, 1)
    assert load < QUIET_LOAD


def test_the_deadline_heap_forgets_answered_requests():
    """32 requests in flight, deadlines of 1 s and 60 s in turn, 2000 answered long before them:
    the heap keeps at most a bounded few of the answered ones (before: 1001 of 2000, each held until
    its own deadline), and nothing a caller hung on a request (its answer callback, which on the
    native front holds the raw request) outlives the answer."""
    loop = asyncio.new_event_loop()
    try:
        deadlines = Deadlines(loop, lambda r: r.expire())
        inflight: list[InflightRequest] = []
        for k in range(2032):
            r = _request(loop, parts=1, timeout=1.0 if k % 2 else 60.0)
            raw = bytearray(1024)  # what the native front's closure holds: the raw request
            r.on_answer = lambda future, held=raw: None
            deadlines.add(r)
            inflight.append(r)
            if len(inflight) > 32:
                done = inflight.pop(0)
                done.part_failed(Unavailable("answered"))
                done.answer()
                deadlines.note_answered()
                assert done.on_answer is None
        answered = sum(e[2].answered for e in deadlines.heap)
        assert answered <= 2 * Deadlines.COMPACT_AT, answered
        assert len(deadlines.heap) - answered == 32
        late = _request(loop, parts=1, timeout=0.01)
        deadlines.add(late)  # requests after a compaction still expire in time
        loop.run_until_complete(asyncio.sleep(0.05))
        assert isinstance(late.error, DeadlineExceeded)
        deadlines.close()
    finally:
        loop.close()


def _replica(index: int, task_w: int = -1, rows: int = 0):
    from enserve.server.dataplane.supervisor import WorkerProcess
    from enserve.server.served.placement import Replica as PlacedReplica

    w = WorkerProcess(index, 0, PlacedReplica("cpu", (0,), 1), SimpleNamespace(label=f"g{index}"))
    w.state, w.task_w, w.rows = WorkerState.READY, task_w, rows
    return w


def test_a_retried_task_never_shares_a_replica_with_its_requests_task_on_the_same_rows():
    """Request 7's members were dealt over replicas A and B (rows 10-10); A died. Its share goes to B
    only after B's own share of the same rows is done: a replica's slots hold one answer per row."""
    from enserve.server.dataplane.dispatch import Dispatch
    from enserve.server.protocol import Task

    loop = asyncio.new_event_loop()
    try:
        dispatch = Dispatch(loop, -1)
        b = _replica(1)
        rt = SimpleNamespace(workers=[b], held=[])
        dispatch.send(b, Task(7, 10, 1, 0b0011, 10))  # B's own share
        other = Task(8, 12, 2, 0b1111, 12)
        dispatch.send(b, other)  # another request's task: rows 12-13
        retried = Task(7, 10, 1, 0b1100, 10)
        dispatch.reroute(rt, retried)
        assert b.deferred == [retried] and len(b.tasks) == 2  # waits behind B's share of request 7
        assert dispatch.out == 2  # handed to a worker: a deferred task is not (yet)
        first = next(tid for tid, t in b.tasks.items() if t.rid == 7)
        assert dispatch.finished(b, next(tid for tid, t in b.tasks.items() if t.rid == 8)) == other
        assert b.deferred == [retried]  # another request finishing does not release it
        assert dispatch.finished(b, first).mask == 0b0011
        assert b.deferred == [] and list(b.tasks.values()) == [retried] and b.rows == 1 and dispatch.out == 1
        dispatch.reroute(rt, Task(7, 11, 1, 0b1111, 10))  # other rows of the same request: no wait
        assert len(b.tasks) == 2 and b.deferred == []
        b.state = WorkerState.STARTING
        held = Task(9, 0, 1, 1, 0)
        dispatch.reroute(rt, held)  # no replica ready: held for the first that starts
        assert rt.held == [held]
        assert dispatch.out == 2
        assert sorted(t.rid for t in dispatch.dropped(b)) == [7, 7] and b.rows == 0 and not b.tasks
        assert dispatch.out == 0  # every replica idle: what the latency policy's idle shortcut reads
    finally:
        loop.close()


def test_descriptors_a_full_pipe_cannot_take_wait_for_room_in_order():
    """A worker that holds a full batch stops reading its task pipe: once the pipe is full, writes
    must not block the event loop. The rest waits, goes out as the worker reads, in order."""
    import fcntl
    import os

    from enserve.server.dataplane.dispatch import Dispatch
    from enserve.server.dataplane.supervisor import F_SETPIPE_SZ
    from enserve.server.protocol import TASK, Task, TaskReader

    async def scenario() -> list[tuple]:
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)  # the smallest pipe
        os.set_blocking(w, False)
        replica = _replica(0, task_w=w)
        dispatch = Dispatch(loop, -1)
        for k in range(2000):  # 2000 x 20 bytes: ten times the pipe
            dispatch.send(replica, Task(k, k, 1, 1, k))
        dispatch.flush()  # returns at once, though the pipe is full
        assert 0 < len(replica.unsent) < 2000 * TASK.size
        got, reader = [], TaskReader()
        deadline = loop.time() + 30
        while len(got) < 2000:
            assert loop.time() < deadline, f"{len(got)} of 2000 descriptors came"
            await asyncio.sleep(0.001)  # the worker reads a little at a time
            got += reader.feed(os.read(r, 1000))
        assert not replica.unsent
        loop.remove_writer(w)
        os.close(w)
        os.close(r)
        return got

    got = asyncio.run(scenario())
    assert [t[1] for t in got] == list(range(2000))  # every descriptor, in order, none cut or lost


def test_an_anytime_request_is_answered_at_its_deadline_with_the_members_done():
    loop = asyncio.new_event_loop()
    try:
        recipe = AnswerRecipe("ens", "ensemble", (PROBS,), 3, 0, (("a", 1.0), ("b", 1.0), ("c", 1.0)))

        def anytime_request() -> InflightRequest:
            r = InflightRequest(7, recipe, start=1, count=2, parts=3, future=loop.create_future(), now=loop.time(),
                                timeout_s=0.05)
            r.members, r.anytime, r.objective_s = ("a", "b", "c"), frozenset({"a"}), 0.055
            return r

        sums = np.zeros((4, 2), np.float32)
        sums[1:3] = [[0.2, 0.8], [0.6, 0.4]]  # a on rows 1-2
        r = anytime_request()
        r.part_done([sums], sums**2, 1, 2, ("a", "b", "c"), 0b001)  # the group's members, and the mask run
        sums[1:3] = [[0.4, 0.6], [0.8, 0.2]]  # b
        r.part_done([sums], sums**2, 1, 2, ("a", "b", "c"), 0b010)
        r.expire()  # c is still out: the answer is a and b's mean, named
        np.testing.assert_allclose(r.future.result()["probs"], [[0.3, 0.7], [0.7, 0.3]])
        np.testing.assert_allclose(r.future.result()["member_variance"], [[0.01], [0.01]], atol=1e-6)  # of a and b
        assert r.used == ("a", "b")
        without_first = anytime_request()
        without_first.part_done([sums], sums**2, 1, 2, ("b",), 1)  # b alone does not hold the first point (a)
        without_first.expire()
        with pytest.raises(DeadlineExceeded, match=r"could not reach the front's first point \(a\) within its "
                                                   r"objective of 55 ms \(members done: b\)"):
            without_first.future.result()
        split = anytime_request()
        split.part_done([sums], sums**2, 1, 1, ("a",), 1)  # one of a's two row shares: not every row has it
        split.expire()
        with pytest.raises(DeadlineExceeded, match=r"no early answer could be made: members \['a'\] had only part of "
                                                   "its 2 rows"):
            split.future.result()
    finally:
        loop.close()
