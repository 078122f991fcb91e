"""Model control against a real daemon: a second ensemble loaded and unloaded under load (explicit
mode), the repository followed (poll mode), names that are not names, and the calls refused when
model control is off."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from enserve.server.served.repository import (
    EnsembleSpec,
    ensemble_config,
    load_repository,
    write_config,
)
from tests.conftest import copy_repo, images, load, shm_objects, start_daemon

PAIR = ["cnn_w12", "cnn_w32"]


def add_ensemble(repo, name: str, members: list[str], spec=None) -> None:
    spec = spec or load_repository(repo)
    first = spec.members[members[0]]
    write_config(repo / name, ensemble_config(EnsembleSpec(name, members, first.inputs, first.outputs, 64),
                                              spec.members))
    (repo / name / "1").mkdir()


def test_load_and_unload_a_second_ensemble_under_load(demo_repo, reference, member_sessions, tmp_path):
    repo = copy_repo(demo_repo, tmp_path)
    add_ensemble(repo, "pair", PAIR)
    expected = {"ensemble": reference,
                "pair": lambda x: np.mean([member_sessions[m].run(None, {"input": x})[0] for m in PAIR], axis=0)}
    daemon = start_daemon(repo, tmp_path, "--model-control-mode", "explicit", "--load-model", "ensemble")
    try:
        g = grpcclient.InferenceServerClient(daemon.grpc_url)
        h = httpclient.InferenceServerClient(daemon.http_url)
        index = {m.name: m.state for m in g.get_model_repository_index().models}
        assert index["pair"] == "UNAVAILABLE" and index["ensemble"] == "READY"
        assert not g.is_model_ready("pair") and not h.is_model_ready("pair")

        first: dict[str, int] = {}
        threads = load(daemon, expected["ensemble"], 8.0, first, n_threads=4)
        time.sleep(1.0)
        t0 = time.monotonic()
        g.load_model("pair")  # workers of its own start beside the serving ones
        load_s = time.monotonic() - t0
        assert g.is_model_ready("pair") and h.is_model_ready("pair")
        x = images(3, seed=9)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(g.infer("pair", [inp]).as_numpy("probs"), expected["pair"](x), atol=1e-5)

        second: dict[str, int] = {}
        pair_threads = load(daemon, expected["pair"], 4.0, second, n_threads=4, model="pair")
        time.sleep(1.5)
        h.unload_model("pair")  # drains what is in flight, then refuses
        with pytest.raises(InferenceServerException, match="unknown model 'pair'") as gone:
            g.infer("pair", [inp])
        assert gone.value.status() == "StatusCode.NOT_FOUND"
        for t in threads + pair_threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads + pair_threads), "a request hung"
        print(f"\nload took {load_s:.2f} s; 'ensemble' during load and unload: {first}; 'pair': {second}")
        assert set(first) == {"ok"} and first["ok"] > 50, first  # not one request of the first failed
        assert second.get("ok", 0) > 20 and second.get("wrong", 0) == 0, second
        assert all(k == "ok" or "unknown model 'pair'" in k for k in second), second
        assert not g.is_model_ready("pair")
        assert {m.name: m.state for m in g.get_model_repository_index().models}["pair"] == "UNAVAILABLE"
        assert daemon.worker_pids().keys() == {"cnn_w12", "cnn_w20", "cnn_w32", "cnn_w56"}  # pair's are gone
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_poll_mode_follows_the_repository(demo_repo, tmp_path):
    repo = copy_repo(demo_repo, tmp_path)
    daemon = start_daemon(repo, tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.5")
    try:
        g = grpcclient.InferenceServerClient(daemon.grpc_url)
        assert g.is_model_ready("ensemble") and not g.is_model_ready("pair")
        with pytest.raises(InferenceServerException, match="not allowed in model control mode 'poll'"):
            g.load_model("pair")
        add_ensemble(repo, "pair", PAIR)
        assert wait_for(lambda: g.is_model_ready("pair")), "the new ensemble was not loaded"
        shutil.rmtree(repo / "pair")
        assert wait_for(lambda: not g.is_model_ready("pair")), "the removed ensemble is still served"
        assert g.is_model_ready("ensemble")
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def test_poll_mode_skips_a_folder_it_cannot_follow_and_follows_the_rest(demo_repo, tmp_path):
    """Folders it cannot follow appear beside a new ensemble: a name that is not a model name, a
    member folder copied before its config was edited (it names another model), a half-written
    config. The ensemble loads, each bad folder is reported once, by name and rule, and the next
    passes go on. Before, the first bad folder aborted every poll pass (logged each time), so the new
    ensemble never loaded."""
    repo = copy_repo(demo_repo, tmp_path)
    daemon = start_daemon(repo, tmp_path, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    try:
        g = grpcclient.InferenceServerClient(daemon.grpc_url)
        spec = load_repository(repo)
        add_ensemble(repo, "bad name", PAIR, spec)
        shutil.copytree(repo / "cnn_w12", repo / "a_copy")  # sorts first; names 'cnn_w12'
        (repo / "broken").mkdir()
        (repo / "broken" / "config.pbtxt").write_text('name: "broken" platform: {{{')
        add_ensemble(repo, "pair", PAIR, spec)  # after the bad folders
        assert wait_for(lambda: g.is_model_ready("pair")), daemon.output()
        time.sleep(1.0)  # a few more passes
        log = daemon.output()
        for folder, why in (("bad name", "model name 'bad name' is not a name"),
                            ("a_copy", "name 'cnn_w12' differs from its directory 'a_copy'"),
                            ("broken", "config.pbtxt")):
            assert log.count(f"repository poll: skipping '{folder}':") == 1, log
            assert why in log.split(f"repository poll: skipping '{folder}':")[1].splitlines()[0], log
        assert g.is_model_ready("ensemble") and "Traceback" not in log and "repository poll failed" not in log
        shutil.rmtree(repo / "pair")
        assert wait_for(lambda: not g.is_model_ready("pair")), "removed while other folders are broken"
    finally:
        assert daemon.stop() == 0
    assert shm_objects(daemon.pid) == []


def wait_for(condition, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("name, status, message", [
    ("../ensemble", "StatusCode.INVALID_ARGUMENT", "is not a name"),
    ("/etc/passwd", "StatusCode.INVALID_ARGUMENT", "is not a name"),
    ("no_such_model", "StatusCode.NOT_FOUND", "unknown model 'no_such_model'"),
])
def test_load_refuses_what_is_not_a_model_name(explicit_daemon, name, status, message):
    g = grpcclient.InferenceServerClient(explicit_daemon.grpc_url)
    for call in (g.load_model, g.unload_model):
        with pytest.raises(InferenceServerException, match=message) as bad:
            call(name)
        assert bad.value.status() == status
    assert g.is_model_ready("ensemble")  # still serving


def test_a_member_goes_with_its_ensemble(explicit_daemon):
    g = grpcclient.InferenceServerClient(explicit_daemon.grpc_url)
    with pytest.raises(InferenceServerException, match=r"'cnn_w12' is served as a member of \['ensemble'\]") as e:
        g.unload_model("cnn_w12")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert g.is_model_ready("cnn_w12") and g.is_model_ready("ensemble")


def test_http_load_of_a_dotted_name_is_a_400(explicit_daemon):
    req = urllib.request.Request(f"http://{explicit_daemon.http_url}/v2/repository/models/..%2F..%2Fetc/load",
                                 data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(req)
    assert bad.value.code in (400, 404)
    assert httpclient.InferenceServerClient(explicit_daemon.http_url).is_model_ready("ensemble")


def test_load_and_unload_are_refused_when_model_control_is_off(daemon):
    g = grpcclient.InferenceServerClient(daemon.grpc_url)
    with pytest.raises(InferenceServerException, match="not allowed in model control mode 'none'") as refused:
        g.load_model("ensemble")
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="--model-control-mode explicit"):
        httpclient.InferenceServerClient(daemon.http_url).unload_model("ensemble")
    assert g.is_model_ready("ensemble")


@pytest.fixture(scope="module")
def explicit_daemon(demo_repo, tmp_path_factory):
    d = start_daemon(demo_repo, tmp_path_factory.mktemp("explicit"), "--model-control-mode", "explicit",
                     "--load-model", "*")
    yield d
    assert d.stop() == 0
    assert shm_objects(d.pid) == []
