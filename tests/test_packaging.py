"""A plain (non-editable) install as users make it: one namespace in site-packages, ``enserve``; and
the installed package, not the clone's folders, serving when ``enserve`` starts from the clone's root
(its workers and the profiler's children run ``python -m enserve...`` from there)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import tritonclient.grpc as grpcclient

from enserve.loadtest import launcher
from tests.conftest import ROOT, copy_repo, images, install_plainly, shm_objects

GENERIC = ("server", "models", "tuning", "optimizer", "loadtest")
SUBPACKAGES = [f"enserve.{n}" for n in GENERIC]


def test_pip_install_puts_only_the_enserve_namespace_into_a_fresh_venv(tmp_path):
    python = install_plainly(ROOT, tmp_path)
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    top_level = sorted(p.name for p in site.iterdir() if not p.name.startswith(("_", ".")))
    assert [n for n in top_level if not n.endswith((".dist-info", ".pth"))] == ["enserve"], top_level
    assert (python.parent / "enserve").is_file()
    probe = (
        "import importlib.util, json\n"
        f"generic = {{n: importlib.util.find_spec(n) is not None for n in {GENERIC!r}}}\n"
        f"ours = {{n: importlib.util.find_spec(n).origin for n in {SUBPACKAGES!r}}}\n"
        "print(json.dumps([generic, ours]))\n"
    )
    for cwd in (tmp_path, ROOT):  # outside the checkout, and at its root, where users run it
        out = subprocess.run([str(python), "-c", probe], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=60)
        generic, ours = json.loads(out.stdout)
        assert generic == dict.fromkeys(GENERIC, False)
        for name, origin in ours.items():
            assert origin.startswith(str(site)), (cwd, name, origin)


def test_a_plain_install_serves_from_the_clones_root(demo_repo, reference, tmp_path):
    """``enserve serve`` of a non-editable install, started in the clone's root as users do: its
    workers run the installed interpreter and package, and the answers are the members' mean. (Before
    the src layout, the root's own ``enserve/`` folder stood in for the package and every worker died
    with "No module named 'enserve.server'"; children now also start with ``python -P``.)"""
    python = install_plainly(ROOT, tmp_path)
    http, grpc_port, metrics = launcher.free_ports(3)
    command = [str(python.parent / "enserve"), "serve", "--model-repository", str(demo_repo), "--no-optimize",
               "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)]
    server = launcher.start_server(command, grpc_port, http_port=http, metrics_port=metrics,
                                   log=tmp_path / "daemon.log", cwd=ROOT, timeout=90)
    try:
        workers = server.worker_pids()
        assert workers, server.output()
        for pids in workers.values():
            for pid in pids:
                exe = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()
                assert exe == str(python), exe  # the workers run the installed interpreter and package
        x = images(3, seed=5)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        got = grpcclient.InferenceServerClient(server.grpc_url).infer("ensemble", [inp]).as_numpy("probs")
        np.testing.assert_allclose(got, reference(x), atol=1e-5)
    finally:
        code = server.stop()
    assert code == 0, server.output()
    assert shm_objects(server.pid) == []


def test_the_profilers_children_import_the_installed_package_from_the_clones_root(demo_repo, tmp_path):
    python = install_plainly(ROOT, tmp_path)
    repo = copy_repo(demo_repo, tmp_path)
    out = subprocess.run([str(python.parent / "enserve"), "allocate", "--model-repository", str(repo),
                          "--bench", "cost", "--batch-sizes", "1,8", "--max-combi", "5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No module named" not in out.stdout + out.stderr
    assert "profiling cnn_w56" in out.stdout
