"""Latency objectives against a real daemon, real clients: an ensemble whose front is (w8), (w8, w16),
(w8, w16, w1024), the last member far slower than the others. A request with an objective shorter
than the slow member is answered from the named cheaper members (equal to the mean of those members
run with ONNX Runtime); overload falls back to cheaper points and the full ensemble returns when the
load stops; the metrics count each point; bad objectives are refused with their rule."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import shm_objects, start_daemon

CHEAP, ALL = ["cnn_w8", "cnn_w16"], ["cnn_w8", "cnn_w16", "cnn_w1024"]


@pytest.fixture(scope="module")
def front_repo(tmp_path_factory):
    from enserve.models.synthetic import write_tiny_cnns
    from enserve.server.served.front import FrontPoint
    from enserve.server.served.importer import import_onnx

    tmp = tmp_path_factory.mktemp("front")
    files = write_tiny_cnns(tmp / "onnx", (8, 16, 1024))
    front = [FrontPoint(tuple(ALL[:k])) for k in (1, 2, 3)]
    import_onnx(files, tmp / "repo", front=front)
    return tmp / "repo", {f.stem: f for f in files}


@pytest.fixture(scope="module")
def served(front_repo, tmp_path_factory):
    repo, files = front_repo
    daemon = start_daemon(repo, tmp_path_factory.mktemp("daemon"))
    yield daemon, files
    assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def mean_of(files, members, x):
    import onnxruntime as ort

    outs = []
    for m in members:
        s = ort.InferenceSession(str(files[m]), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {s.get_inputs()[0].name: x})[0])
    return np.mean(outs, axis=0)


def ask(client, x, objective=None, model="ensemble", members_used=None):
    """probs, the members named in the answer's parameters, and the ``members_used`` output (asked for
    by name, by default of an ensemble: a request naming no output does not get it)."""
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    named = model == "ensemble" if members_used is None else members_used
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("probs", "members_used")] if named else None
    result = client.infer(model, [inp], outputs=outputs,
                          parameters=None if objective is None else {"objective_ms": objective})
    params = result.get_response().parameters
    used = params["enserve_members"].string_param.split(",") if "enserve_members" in params else None
    mask = result.as_numpy("members_used")  # per row, the members (in step order) the answer combined
    if used is not None and mask is not None:
        assert mask.tolist() == [[m in used for m in ALL[: mask.shape[1]]]] * len(x), (mask, used)
    return result.as_numpy("probs"), used, mask


def slow_member_ms(client, x) -> float:
    ask(client, x, model="cnn_w1024")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        ask(client, x, model="cnn_w1024")
        times.append((time.perf_counter() - t) * 1e3)
    return min(times)


def test_an_objective_below_the_slow_member_is_answered_by_the_named_cheaper_members(served):
    daemon, files = served
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    slow = slow_member_ms(client, x[:1])
    out, used, mask = ask(client, x, objective=slow / 3)
    assert used == CHEAP, (used, slow)
    assert mask.dtype == np.bool_ and mask.tolist() == [[True, True, False]] * 2
    np.testing.assert_allclose(out, mean_of(files, CHEAP, x), atol=1e-5)
    out, used, mask = ask(client, x)  # no objective: the whole ensemble, and no parameter
    assert used is None and mask.tolist() == [[True, True, True]] * 2
    np.testing.assert_allclose(out, mean_of(files, ALL, x), atol=1e-5)
    out, used, mask = ask(client, x, objective=0)  # 0: none for this request
    assert used is None and mask.all()
    out, used, mask = ask(client, x, objective=slow / 3, members_used=False)  # not named: not returned
    assert used == CHEAP and mask is None
    meta = client.get_model_metadata("ensemble", as_json=True)
    assert {"name": "members_used", "datatype": "BOOL", "shape": ["-1", "3"]} in meta["outputs"], meta
    assert all(o["name"] != "members_used" for o in client.get_model_metadata("cnn_w8", as_json=True)["outputs"])
    # over HTTP: the same answer, the members named in the response's parameters
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
            "outputs": [{"name": "probs"}, {"name": "members_used"}], "parameters": {"objective_ms": slow / 3}}
    req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/ensemble/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.loads(r.read())
    assert answer["parameters"] == {"enserve_members": ",".join(CHEAP)}
    used_out = next(o for o in answer["outputs"] if o["name"] == "members_used")
    assert (used_out["datatype"], used_out["shape"], used_out["data"]) == ("BOOL", [2, 3], [True, True, False] * 2)
    probs = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
    np.testing.assert_allclose(probs, mean_of(files, CHEAP, x), atol=1e-5)


def test_overload_falls_back_to_cheaper_points_and_the_whole_ensemble_returns(served):
    daemon, files = served
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    from enserve.server.dataplane.adaptive import PLAN_SHARE

    # the plan may fill twice the slow member's time: idle, the whole ensemble fits well within it
    objective = 2 * slow_member_ms(client, x) / PLAN_SHARE
    assert ask(client, x, objective)[1] == ALL
    used: list[list[str]] = []
    errors: list[str] = []

    def user() -> None:
        c = grpcclient.InferenceServerClient(daemon.grpc_url)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                out, members, _ = ask(c, x, objective)
                used.append(members)
                np.testing.assert_allclose(out, mean_of_cached(members), atol=1e-5)
            except (InferenceServerException, AssertionError) as exc:
                errors.append(str(exc)[:300])
        c.close()

    means = {n: mean_of(files, ALL[:n], x) for n in (1, 2, 3)}

    def mean_of_cached(members):
        assert members == ALL[:len(members)], members
        return means[len(members)]

    threads = [threading.Thread(target=user) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    sizes = [len(m) for m in used]
    assert sizes.count(3) < len(sizes) / 2 and sizes.count(2) > 0, sizes  # the slow member mostly left out
    back = None
    for _ in range(20):  # load gone: the whole ensemble again, once the slow member's queue has drained
        time.sleep(0.25)
        back = ask(client, x, objective)[1]
        if back == ALL:
            break
    assert back == ALL, back
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    counts = {int(line.split('members="')[1].split('"')[0]): float(line.split()[-1])
              for line in metrics.splitlines() if line.startswith("enserve_front_answers_total{")}
    assert counts.get(2, 0) >= sizes.count(2) and counts.get(3, 0) >= sizes.count(3) + 2, (counts, sizes)
    skipped = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("enserve_members_skipped_total{")]
    assert skipped and skipped[0] >= sizes.count(2), metrics


@pytest.mark.parametrize("objective, message", [
    (-5, "objective_ms is -5, but must be a finite number of milliseconds >= 0"),
    ("fast", "parameter 'objective_ms' must be a number of milliseconds"),
    (1e-6, "is below what the cheapest point of the front of model 'ensemble' needs for one row"),
])
def test_a_bad_objective_is_refused_with_its_rule(served, objective, message):
    daemon, _ = served
    x = np.zeros((1, 3, 32, 32), np.float32)
    client = grpcclient.InferenceServerClient(daemon.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        ask(client, x, objective)
    assert message in info.value.message() and "INVALID_ARGUMENT" in str(info.value.status()), info.value
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}],
            "parameters": {"objective_ms": objective}}
    req = urllib.request.Request(f"http://{daemon.http_url}/v2/models/ensemble/infer", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=30)
    assert http.value.code == 400
    assert "objective" in json.loads(http.value.read())["error"]


def test_the_open_loop_bench_scores_three_servers_against_labels(front_repo, tmp_path):
    """``enserve bench --rate``: the fixed ensemble, its cheapest point alone and the adaptive server,
    each answer scored against labels; the labels here are the whole ensemble's own answers, so the
    fixed server must score 1 exactly, and the cheapest point alone what its member's answers give."""
    import subprocess
    import sys

    repo, files = front_repo
    x = np.random.default_rng(2).random((40, 3, 32, 32), dtype=np.float32)
    y = mean_of(files, ALL, x).argmax(1)
    cheap_right = mean_of(files, ALL[:1], x).argmax(1) == y
    np.savez(tmp_path / "labelled.npz", x_test=x, y_test=y)
    done = subprocess.run([sys.executable, "-m", "enserve", "bench", "--model-repository", str(repo), "--rate", "3",
                           "--seconds", "2", "--images", "1", "--objective-ms", "5000", "--labelled",
                           str(tmp_path / "labelled.npz"), "--plot", str(tmp_path / "sweep.png"), "--",
                           "--no-optimize"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in ("fixed", "cheapest", "adaptive")}
    assert set(rows) == {"fixed", "cheapest", "adaptive"}, done.stdout
    assert float(rows["fixed"][9]) == 1.0 and rows["fixed"][10] == "0", rows["fixed"]
    assert rows["fixed"][-1] == "-"  # no objective: no members named
    asked = round(float(rows["cheapest"][2]) * 2)  # requests sent: rows 0, 1, ... of the stream, one each
    assert float(rows["cheapest"][9]) == pytest.approx(np.mean(cheap_right[:asked]), abs=1e-4), rows["cheapest"]
    assert rows["adaptive"][-1].startswith(("1:", "2:", "3:")), rows["adaptive"]  # e.g. 3:100%
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_an_objective_is_ignored_without_a_front_and_taken_from_the_config(tmp_path):
    """'plain' has no front: an objective (even one below any member's time) changes nothing;
    'defaulted' sets enserve.objective_ms in its config: its answers name their members unasked."""
    from enserve.models.synthetic import write_tiny_cnns
    from enserve.server.served.front import FrontPoint
    from enserve.server.served.importer import import_onnx

    files = write_tiny_cnns(tmp_path / "onnx", (8, 16))
    import_onnx(files, tmp_path / "repo", ensemble="plain")
    import_onnx(files, tmp_path / "repo", ensemble="defaulted", notes={"enserve.objective_ms": "2000"},
                front=[FrontPoint(("cnn_w8",)), FrontPoint(("cnn_w8", "cnn_w16"))])
    daemon = start_daemon(tmp_path / "repo", tmp_path)
    try:
        client = grpcclient.InferenceServerClient(daemon.grpc_url)
        x = np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)
        expected = mean_of({f.stem: f for f in files}, CHEAP, x)
        out, used, mask = ask(client, x, objective=1e-4, model="plain")
        assert used is None and mask is None  # no front: no members_used output either
        np.testing.assert_allclose(out, expected, atol=1e-5)
        out, used, _ = ask(client, x, model="defaulted")
        assert used == CHEAP  # the config's 2 s objective: the whole front fits, and the answer says so
        np.testing.assert_allclose(out, expected, atol=1e-5)
        assert ask(client, x, objective=0, model="defaulted")[1] is None  # 0: none, the config's included
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []
