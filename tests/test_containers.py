"""Container conditions made for real (CI runs as root on Debian): a small tmpfs as /dev/shm in a
private mount namespace (``unshare -m``), and the daemon as PID 1 of its own pid namespace
(``unshare -p -f --mount-proc``), SIGKILLed and started again on the same /dev/shm, as a pod restart
does. The tmpfs is mounted outside the namespaces so that it outlives each daemon, as a pod's
``emptyDir`` does, and the test can look into it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from enserve.loadtest.launcher import container_command, mount_tmpfs, namespace_pid1
from tests.conftest import load, start_daemon

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")


@pytest.fixture
def tmpfs(tmp_path):
    """``make(mib)``: a fresh tmpfs of that size standing in for a container's /dev/shm."""
    mounts: list[Path] = []

    def make(mib: int) -> Path:
        path = tmp_path / f"shm{len(mounts)}"
        try:
            mount_tmpfs(path, mib)
        except PermissionError as exc:
            pytest.skip(f"{exc} (CI runs as root)")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=True)


def objects(shm: Path) -> list[str]:
    return sorted(p.name for p in shm.iterdir())


def used_mib(shm: Path) -> float:
    st = os.statvfs(shm)
    return (st.f_blocks - st.f_bfree) * st.f_frsize / 2**20


def serve_ok(daemon, reference, seconds: float, n_threads: int, n_images: int) -> dict[str, int]:
    results: dict[str, int] = {}
    for t in load(daemon, reference, seconds, results, n_threads=n_threads, n_images=n_images):
        t.join()
    return results


def test_a_small_dev_shm_serves_under_load_within_its_budget(demo_repo, reference, tmpfs, tmp_path):
    """A 4 MiB /dev/shm (the rings would want 64 MiB): the default budget (80 % of what is free)
    sizes the ring to fit and reserves it, and 16 clients x 8 images are all answered correctly."""
    shm = tmpfs(4)
    daemon = start_daemon(demo_repo, tmp_path, wrap=container_command(shm))
    try:
        assert objects(shm), "the daemon's objects live in the container's /dev/shm"
        reserved = used_mib(shm)
        assert 0.8 <= reserved <= 0.8 * 4 + 0.05, reserved  # reserved up front (fallocate), within budget
        results = serve_ok(daemon, reference, 4.0, n_threads=16, n_images=8)
        assert set(results) == {"ok"} and results["ok"] > 16, results
        assert used_mib(shm) == pytest.approx(reserved, abs=0.01)  # nothing grows under load
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    assert objects(shm) == []


@pytest.mark.parametrize("mib,budget,message", [
    (4, "64K", r"the models need at least 0\.8 MiB \(one max batch per input ring and output slot\), but "
               r"/dev/shm has 4\.0 MiB free and --shm-budget is 0\.1 MiB; raise --shm-budget, or give the "
               r"container a larger /dev/shm"),
    (4, "48M", r"/dev/shm has no room for .* MiB more \(.* MiB free\); lower --shm-budget, or give the "
               r"container a larger /dev/shm \(docker --shm-size"),
])
def test_a_budget_that_cannot_fit_is_a_clear_start_up_error(demo_repo, tmpfs, tmp_path, mib, budget, message):
    import re

    shm = tmpfs(mib)
    daemon = start_daemon(demo_repo, tmp_path, "--shm-budget", budget, wrap=container_command(shm), wait=False)
    try:
        code = daemon.proc.wait(30)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 1, daemon.output()
    assert re.search(message, daemon.output()), daemon.output()
    assert "Traceback" not in daemon.output()
    assert objects(shm) == []  # nothing left, the owner lock included


def test_pid1_sigkilled_restarts_and_never_touches_a_live_neighbour(demo_repo, reference, tmpfs, tmp_path):
    """Two daemons, each PID 1 of its own pid namespace, share one /dev/shm. One is SIGKILLed (an OOM
    kill) and started again, as a pod restart does: the new one starts, removes only the dead one's
    objects, and the live neighbour (same pid, other namespace) keeps its objects and serves."""
    shm = tmpfs(16)
    first = start_daemon(demo_repo, tmp_path, wrap=container_command(shm, pid_namespace=True))
    neighbour = None
    try:
        first_pid = namespace_pid1(first.pid)
        first_objects = objects(shm)
        assert first_objects and all(n.startswith("enserve.1.") for n in first_objects), first_objects
        neighbour = start_daemon(demo_repo, tmp_path, wrap=container_command(shm, pid_namespace=True))
        neighbour_pid = namespace_pid1(neighbour.pid)
        neighbour_objects = sorted(set(objects(shm)) - set(first_objects))
        assert neighbour_objects and all(n.startswith("enserve.1.") for n in neighbour_objects)
        first.stop(pid=first_pid, sig=signal.SIGKILL)
        assert set(first_objects) <= set(objects(shm)), "a SIGKILL leaves the objects behind"
        restarted = start_daemon(demo_repo, tmp_path, wrap=container_command(shm, pid_namespace=True))
        try:
            restarted_pid = namespace_pid1(restarted.pid)
            assert "removed shared memory left by a crashed daemon" in restarted.output()
            now = objects(shm)
            assert not set(first_objects) & set(now), "the dead run's objects are gone"
            assert set(neighbour_objects) <= set(now), "the live neighbour's objects are untouched"
            for d in (restarted, neighbour):
                results = serve_ok(d, reference, 1.5, n_threads=4, n_images=8)
                assert set(results) == {"ok"}, results
        finally:
            code = restarted.stop(pid=restarted_pid)
        assert code == 0, restarted.output()
        assert set(objects(shm)) == set(neighbour_objects)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
        if neighbour is not None:
            code = neighbour.stop(pid=neighbour_pid)
            assert code == 0, neighbour.output()
    assert objects(shm) == []


def test_a_daemon_starts_beside_another_users_objects(demo_repo, reference, tmpfs, tmp_path):
    """/dev/shm holds a dead run's objects that another user owns (uid 1234, mode 0600), which this
    daemon may neither open nor remove: it runs without root's power over other users' files (the
    DAC-override capabilities dropped), as a non-root daemon does. Before, posix_ipc's
    PermissionsError stopped the start with a traceback; now it starts, says whose objects it left
    alone, and serves."""
    shm = tmpfs(16)
    foreign = ["enserve.4242.abcdef012345.lock", "enserve.4242.abcdef012345.u0.in0.0"]
    for name in foreign:
        (shm / name).write_bytes(b"\0" * 64)
        os.chown(shm / name, 1234, 1234)
        os.chmod(shm / name, 0o600)
    unprivileged = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    daemon = start_daemon(demo_repo, tmp_path, wrap=container_command(shm) + unprivileged)
    try:
        log = daemon.output()
        assert "Traceback" not in log
        assert ("leaving /dev/shm/enserve.4242.abcdef012345.lock (2 objects of run 4242.abcdef012345) alone: it "
                "belongs to uid 1234 and this daemon runs as root (uid 0), so it may not check or remove it" in log), log
        results = serve_ok(daemon, reference, 1.0, n_threads=2, n_images=2)
        assert set(results) == {"ok"}, results
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    assert objects(shm) == sorted(foreign)  # its own objects gone, the other user's untouched
