"""Unit tests with exact answers: row ring, descriptor framing, batch collection, repository rules."""

from __future__ import annotations

import os
import time
from collections import deque

import numpy as np
import pytest

from enserve.models.synthetic import write_tiny_cnns
from enserve.server.dataplane.slots import InputRing, RowRing
from enserve.server.dataplane.worker import collect
from enserve.server.errors import InvalidArgument, RepositoryError
from enserve.server.protocol import (
    BURST,
    DONE,
    FLAGS,
    MAX_GROUP_MEMBERS,
    STATUS_OK,
    TASK,
    WEIGHTED,
    DoneReader,
    TaskReader,
    combine_flags,
    pack_done,
)
from enserve.server.served.importer import import_onnx
from enserve.server.served.placement import Placement, Replica, WorkerGroup, check
from enserve.server.served.repository import TensorSpec, load_repository, parse_cores


def pack_tasks(tasks: list[tuple[int, int, int, int, int]]) -> bytes:
    """Descriptors as dispatch writes them (``TASK.pack`` each)."""
    return b"".join(TASK.pack(*t) for t in tasks)


def test_row_ring_contiguous_wrap_and_out_of_order_free():
    ring = RowRing(10)
    assert ring.alloc(4) == 0
    assert ring.alloc(4) == 4
    assert ring.alloc(3) is None  # 8 used, 2 left at the end, 3 do not fit anywhere
    assert ring.release(4)  # out of order: tail cannot move past row 0 yet
    assert ring.alloc(3) is None
    assert ring.release(0)  # now everything before head is free
    assert ring.used == 0
    assert ring.alloc(3) == 0  # an empty ring starts over at row 0 (warm rows), no wrap gap
    assert ring.used == 3 and ring.head == 3
    assert ring.alloc(5) == 3
    ring.release(0)
    assert ring.alloc(3) == 0  # 2 rows at the end skipped, wrapped to row 0
    assert ring.used == 10 and ring.head == 3
    assert ring.alloc(1) is None
    ring.release(3)  # the skipped gap leaves with the range before it
    assert ring.used == 3
    with pytest.raises(ValueError, match="not allocated"):
        ring.release(9)
    with pytest.raises(ValueError, match=r"row count is 11, but must be in \[1, 10\]"):
        ring.alloc(11)


def test_row_ring_frees_rows_only_when_their_last_holder_lets_go():
    """A's request expires with its two tasks still at workers: its rows stay A's until both tasks
    are done, so B gets other rows; once A's last task lets go, an empty ring starts over at 0."""
    ring = RowRing(8)
    a = ring.alloc(2)
    ring.retain(a, 2)  # two tasks name A's rows (two worker groups)
    assert (a, ring.count(a)) == (0, 2)
    assert not ring.release(a)  # A expires: answered, but its tasks are still out
    b = ring.alloc(2)
    assert b == 2  # not A's rows
    ring.retain(b, 1)
    assert not ring.release(a)  # one of A's tasks skipped
    assert ring.alloc(6) is None  # A's rows are still held: 4 rows used, 4 left, 6 do not fit
    assert ring.release(a)  # A's last task is done: its rows are free
    assert ring.used == 2  # only B's rows are in use now
    assert not ring.release(b) and ring.release(b)  # B answered, then its task done
    assert ring.used == 0 and ring.alloc(3) == 0
    with pytest.raises(ValueError, match="row 2 is not allocated"):
        ring.retain(2)


def test_a_request_larger_than_the_ring_is_a_clear_invalid_argument():
    ring = InputRing(f"test{time.monotonic_ns()}", [TensorSpec("x", "FP32", (3,))], capacity=8)
    try:
        with pytest.raises(InvalidArgument, match="a request of 9 rows is larger than the shared input ring of 8"):
            ring.put([np.zeros((9, 3), np.float32)], 9)
        assert ring.put([np.ones((8, 3), np.float32)], 8) == 0  # the ring itself is unharmed
    finally:
        ring.close()


def test_descriptor_framing_survives_arbitrary_chunks():
    tasks = [(1, 0, 3, 0, 1), (2, 3, 1, 500, 5), (4294967295, 100, 64, 0, 0xFFFFFFFF),
             (5, 7, 2, 0, BURST | WEIGHTED | combine_flags(2, True) | (1 << MAX_GROUP_MEMBERS) - 1)]
    blob = pack_tasks(tasks)
    reader = TaskReader()
    got = []
    for i in range(0, len(blob), 5):
        got += reader.feed(blob[i : i + 5])
    assert got == tasks
    frames = b"".join(pack_done(3, STATUS_OK, [7, 8], "", 4, (1, 2, 3, 4)) + pack_done(0, 1, [9], "boom", 1))
    done = DoneReader()
    out = done.feed(frames[:17]) + done.feed(frames[17:])
    assert [(f.worker, f.status, f.ids, f.message, f.rows) for f in out] == [
        (3, 0, (7, 8), "", 4), (0, 1, (9,), "boom", 1)]
    assert (out[0].queue_ns, out[0].input_ns, out[0].infer_ns, out[0].output_ns) == (1, 2, 3, 4)


def test_a_group_has_as_many_members_as_a_task_mask_names():
    """A task's mask names up to MAX_GROUP_MEMBERS members below its flags (a larger group is refused
    by ``check``, which every placement passes through: configs, plans, the allocator's bench)."""
    assert ((1 << MAX_GROUP_MEMBERS) - 1) & FLAGS == 0
    group = [f"m{k}" for k in range(MAX_GROUP_MEMBERS)]
    one = (Replica("cpu", (0,), 1),)
    check(Placement((WorkerGroup(tuple(group), one, 8),)))
    with pytest.raises(RepositoryError, match=f"has {MAX_GROUP_MEMBERS + 1} members, but must have 1 to "
                                              f"{MAX_GROUP_MEMBERS}"):
        check(Placement((WorkerGroup((*group, "one_more"), one, 8),)))


def test_done_frames_fit_pipe_buf_so_shared_pipe_writes_stay_atomic():
    ids = list(range(2000))
    chunks = pack_done(1, STATUS_OK, ids, "x" * 5000, 2000, (5, 6, 7, 8))
    assert len(chunks) > 1 and max(len(c) for c in chunks) <= 4096  # each one atomic write
    frames = DoneReader().feed(b"".join(chunks))
    assert [i for f in frames for i in f.ids] == ids
    assert sum(f.rows for f in frames) == 2000 and frames[0].infer_ns == 7 and frames[1].infer_ns == 0
    assert [DONE.size + 4 * len(f.ids) + len(f.message.encode()) for f in frames] == [len(c) for c in chunks]


def test_collect_blocks_for_first_then_fills_batch():
    r, w = os.pipe()
    try:
        os.write(w, pack_tasks([(1, 0, 2, 0, 1), (2, 2, 2, 0, 1), (3, 4, 2, 0, 1)]))
        backlog: deque = deque()
        batch = collect(r, TaskReader(), backlog, batch_size=4, delay_s=10.0)
        assert [t[:3] for t in batch] == [(1, 0, 2), (2, 2, 2)]  # full at 4 rows: no waiting
        assert [t[:3] for t in backlog] == [(3, 4, 2)]
        t0 = time.monotonic()
        batch = collect(r, TaskReader(), backlog, batch_size=4, delay_s=0.05)
        assert [t[:3] for t in batch] == [(3, 4, 2)]
        assert 0.04 <= time.monotonic() - t0 < 2  # waited the delay for more, then ran what it had
    finally:
        os.close(w)
    with pytest.raises(EOFError):
        collect(r, TaskReader(), deque(), batch_size=4, delay_s=0.0)
    os.close(r)


def test_collect_takes_oversized_task_alone():
    r, w = os.pipe()
    os.write(w, pack_tasks([(1, 0, 10, 0, 1), (2, 10, 1, 0, 1)]))
    os.close(w)
    backlog: deque = deque()
    assert [t[:3] for t in collect(r, TaskReader(), backlog, 4, 0.0)] == [(1, 0, 10)]
    assert [t[:3] for t in collect(r, TaskReader(), backlog, 4, 0.0)] == [(2, 10, 1)]
    os.close(r)


def test_parse_cores():
    assert parse_cores("0,2-3") == (0, 2, 3)
    with pytest.raises(RepositoryError, match="'a-b' is invalid"):
        parse_cores("a-b")


def test_import_writes_triton_layout_and_reads_back(tmp_path):
    files = write_tiny_cnns(tmp_path / "onnx", (4, 6))
    repo = import_onnx(files, tmp_path / "repo", ensemble="ens", max_batch_size=16, batch_size=4)
    assert sorted(repo.members) == ["cnn_w4", "cnn_w6"]
    assert (tmp_path / "repo" / "cnn_w4" / "1" / "model.onnx").is_file()
    again = load_repository(tmp_path / "repo")
    ens = again.ensembles["ens"]
    assert ens.members == ["cnn_w4", "cnn_w6"] and ens.max_batch_size == 16
    assert [t.name for t in ens.outputs] == ["probs", "entropy", "member_variance"]
    assert again.members["cnn_w6"].batch_size == 4
    assert again.members["cnn_w6"].inputs[0].dims == (3, 32, 32)


def test_import_names_the_member_that_disagrees(tmp_path):
    import onnx

    from enserve.models.synthetic import tiny_cnn

    a = tmp_path / "a.onnx"
    b = tmp_path / "b.onnx"
    onnx.save(tiny_cnn(4, seed=0), str(a))
    onnx.save(tiny_cnn(4, seed=1, classes=7), str(b))
    with pytest.raises(RepositoryError, match=r"member 'b' .*'probs' is FP32\[7\], but 'a' has FP32\[10\]"):
        import_onnx([a, b], tmp_path / "repo")
    onnx.save(tiny_cnn(4, seed=1, image_size=16), str(b))
    with pytest.raises(RepositoryError, match=r"'input' is FP32\[3, 16, 16\], but 'a' has FP32\[3, 32, 32\]"):
        import_onnx([a, b], tmp_path / "repo")


def test_import_rejects_fixed_batch_axis(tmp_path):
    import onnx

    from enserve.models.synthetic import tiny_cnn

    model = tiny_cnn(4, seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    with pytest.raises(RepositoryError, match="fixed first dimension 1; export it with a dynamic batch axis"):
        import_onnx([tmp_path / "fixed.onnx"], tmp_path / "repo")
    with pytest.raises(RepositoryError, match="does not exist"):
        import_onnx([tmp_path / "missing.onnx"], tmp_path / "repo")


def test_synthetic_members_differ_in_size():
    from enserve.models.synthetic import tiny_cnn

    sizes = [sum(np.prod(t.dims) for t in tiny_cnn(w, seed=0).graph.initializer) for w in (12, 20, 32, 56)]
    assert sizes == sorted(sizes) and sizes[-1] > 10 * sizes[0]


def test_collect_waits_for_the_task_wait_budget():
    r, w = os.pipe()
    try:
        os.write(w, pack_tasks([(1, 0, 1, 50_000, 1)]))  # may wait 50 ms to fill a batch
        t0 = time.monotonic()
        batch = collect(r, TaskReader(), deque(), batch_size=4, delay_s=0.0)
        assert [t[:3] for t in batch] == [(1, 0, 1)] and time.monotonic() - t0 >= 0.045
        os.write(w, pack_tasks([(2, 1, 1, 0, 1)]))  # a lone request's budget is 0: no wait
        t0 = time.monotonic()
        collect(r, TaskReader(), deque(), batch_size=4, delay_s=0.0)
        assert time.monotonic() - t0 < 0.04
    finally:
        os.close(w)
        os.close(r)


def test_wait_budget_is_the_gap_to_the_slowest_group_capped():
    from enserve.server.dataplane.dispatch import wait_budget

    assert wait_budget(3000, slowest_ns=2_500_000.0, own_ns=200_000.0) == 2300
    assert wait_budget(3000, slowest_ns=2_500_000.0, own_ns=2_500_000.0) == 0
    assert wait_budget(3000, slowest_ns=9_000_000.0, own_ns=0.0) == 3000  # capped
    assert wait_budget(3000, slowest_ns=100.0, own_ns=900.0) == 0  # never negative
    assert wait_budget(0, slowest_ns=9_000_000.0, own_ns=0.0) == 0  # off


def test_the_latency_histogram_buckets_and_exports_cumulative_counts():
    from prometheus_client import CollectorRegistry, generate_latest

    from enserve.server.dataplane.stats import (
        LATENCY_BUCKETS_S,
        MetricsCollector,
        ModelStats,
        latency_bucket,
    )

    assert [latency_bucket(ns) for ns in (0, 500_000, 500_001, 1_000_000, 2_500_000, 10**10, 10**10 + 1)] == \
        [0, 0, 1, 1, 3, len(LATENCY_BUCKETS_S) - 1, len(LATENCY_BUCKETS_S)]
    stats = ModelStats("ensemble")
    for ns in (400_000, 900_000, 1_500_000, 20 * 10**9):
        stats.latency_counts[latency_bucket(ns)] += 1
        stats.latency_sum_ns += ns
    registry = CollectorRegistry()
    registry.register(MetricsCollector(lambda: {"ensemble": stats, "member": ModelStats("member")}))
    text = generate_latest(registry).decode()
    bucket = 'enserve_request_duration_seconds_bucket{le="%s",model="ensemble",version="1"} %s'
    for le, n in (("0.0005", "1.0"), ("0.001", "2.0"), ("0.002", "3.0"), ("10.0", "3.0"), ("+Inf", "4.0")):
        assert bucket % (le, n) in text, (le, n)
    assert 'enserve_request_duration_seconds_count{model="ensemble",version="1"} 4.0' in text
    assert 'enserve_request_duration_seconds_sum{model="ensemble",version="1"} 20.0028' in text
    assert 'enserve_request_duration_seconds_count{model="member"' not in text  # no requests of its own


def test_write_atomically_replaces_the_whole_file_and_leaves_no_temporary_one(tmp_path):
    from enserve.optimizer.files import write_atomically

    target = tmp_path / "plan.json"
    target.write_bytes(b"old content, longer than the new one")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_collect_skips_the_tasks_of_cancelled_requests():
    """Tasks whose first row is not live are not run: their ids go to ``skipped``, when read and
    again when the batch is taken; a read that brings only such tasks returns at once, empty."""
    live = np.ones(16, np.uint8)
    live[4:8] = 0  # request on rows 4-7 cancelled
    r, w = os.pipe()
    try:
        os.write(w, pack_tasks([(1, 4, 2, 0, 1), (2, 6, 2, 0, 1)]))  # both on cancelled rows
        skipped: list[int] = []
        backlog: deque = deque()
        assert collect(r, TaskReader(), backlog, 4, 10.0, live, skipped) == []  # no 10 s wait for nothing
        assert skipped == [1, 2] and not backlog
        skipped.clear()
        os.write(w, pack_tasks([(3, 0, 2, 0, 1), (4, 4, 1, 0, 1), (5, 8, 2, 0, 1)]))
        batch = collect(r, TaskReader(), backlog, 4, 0.0, live, skipped)
        assert [t[0] for t in batch] == [3, 5] and skipped == [4]
        skipped.clear()
        os.write(w, pack_tasks([(6, 10, 2, 0, 1), (7, 12, 2, 0, 1)]))
        first = collect(r, TaskReader(), backlog, 2, 0.0, live, skipped)  # takes 6; 7 waits in the backlog
        assert [t[0] for t in first] == [6] and [t[0] for t in backlog] == [7]
        live[12:14] = 0  # 7's request is cancelled while it waits
        os.write(w, pack_tasks([(8, 14, 1, 0, 1)]))
        assert collect(r, TaskReader(), backlog, 2, 0.0, live, skipped) == [] and skipped == [7]  # reported at once
        assert [t[0] for t in collect(r, TaskReader(), backlog, 2, 0.0, live, skipped)] == [8]
    finally:
        os.close(w)
        os.close(r)


@pytest.mark.parametrize("requested, tls, host, token, expected", [
    ("auto", False, "127.0.0.1", False, "native"),  # loopback: every caller is local
    ("auto", False, "::1", False, "native"),
    ("auto", False, "0.0.0.0", False, "grpcio"),  # an open port, no token: bounded from the length
    ("auto", False, "0.0.0.0", True, "native"),  # the front checks the token before reading
    ("auto", True, "0.0.0.0", True, "grpcio"),  # TLS: the native front has none
    ("native", False, "0.0.0.0", False, "native"),  # asked for: trusted callers
    ("grpcio", False, "127.0.0.1", False, "grpcio"),
])
def test_the_transport_auto_picks(requested, tls, host, token, expected):
    from enserve.server.config import transport_for

    assert transport_for(requested, tls=tls, host=host, token=token) == expected


def test_serve_options_refuse_what_cannot_go_together():
    from pathlib import Path

    from enserve.server.config import ServeOptions

    for options, message in (
        (ServeOptions(tls_cert=Path("c.pem")), "TLS needs both --tls-cert and --tls-key"),
        (ServeOptions(grpc_transport="native", tls_cert=Path("c"), tls_key=Path("k")), "the native gRPC transport has no TLS"),
        (ServeOptions(load_model=("ensemble",)), "--load-model needs --model-control-mode explicit"),
    ):
        with pytest.raises(ValueError, match=message):
            options.validate()
