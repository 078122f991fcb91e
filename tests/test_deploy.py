"""What ``deploy/`` ships: the writer of the HAProxy and Prometheus configurations (known answers,
refusals), the shipped files equal to its output and accepted by haproxy and promtool, the
Dockerfile clean under hadolint and its entrypoint serving as PID 1, and the Kubernetes manifests
valid against the schemas and consistent with the image and the daemon."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from enserve.deploy import Backend, BalancerPorts, HealthCheck, haproxy_config, parse_backend
from enserve.loadtest import launcher
from tests.conftest import ROOT, apt_install, images, install_plainly

DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("spec,backend", [
    ("10.0.0.1", Backend("10.0.0.1", 8000, 8001, 8002)),
    ("node-a.example:9000,9001", Backend("node-a.example", 9000, 9001, 8002)),
    ("127.0.0.1:1,2,3", Backend("127.0.0.1", 1, 2, 3)),
    ("[::1]:8000,8001,8002", Backend("[::1]", 8000, 8001, 8002)),
    ("[fd00::5]", Backend("[fd00::5]")),
])
def test_backends_parse(spec, backend):
    assert parse_backend(spec) == backend


@pytest.mark.parametrize("spec,message", [
    ("h:8000", "give HTTP,GRPC or HTTP,GRPC,METRICS ports after the host, not 1 port"),
    ("h:1,2,3,4", "not 4 port"),
    ("h:80,x", "port 'x' is not a number in 1-65535"),
    ("h:0,1", "port '0' is not a number in 1-65535"),
    ("bad host:1,2", "'bad host' is not a host name or address"),
    (":1,2", "'' is not a host name or address"),
    ("h:", "port '' is not a number in 1-65535"),
])
def test_bad_backends_are_refused_with_the_rule(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_backend(spec)


def test_the_haproxy_config_balances_grpc_per_request_with_checks_and_retries():
    text = haproxy_config([Backend("a"), Backend("b", 9000, 9001, 9002)], BalancerPorts(80, 81, 82),
                          HealthCheck(500, 3, 2))
    assert "bind :81 proto h2" in text and "bind :80\n" in text  # HTTP/2 from the clients
    assert "server enserve0 a:8001 proto h2 track enserve_http/enserve0" in text  # and to the daemons
    assert "server enserve1 b:9000 check" in text
    assert "http-check send meth GET uri /v2/health/ready" in text
    assert "default-server inter 500ms fall 3 rise 2" in text
    assert "retry-on conn-failure empty-response 503" in text and "option redispatch" in text
    assert "prometheus-exporter" in text and "stats uri /stats" in text
    assert HealthCheck(500, 3, 2, 1000).detection_window_s() == 4.5
    with pytest.raises(ValueError, match="given twice"):
        haproxy_config([Backend("a"), Backend("a")])
    with pytest.raises(ValueError, match="no backends"):
        haproxy_config([])


def _written_by(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Written by: enserve deploy "), first
    return shlex.split(first.removeprefix("# Written by: "))[1:]


@pytest.mark.parametrize("path,checker", [
    ("haproxy/haproxy.cfg", ("haproxy", "haproxy", ["-c", "-f"])),
    ("prometheus/prometheus.yml", ("prometheus", "promtool", ["check", "config"])),
])
def test_the_shipped_configs_are_what_enserve_deploy_writes_and_their_tools_accept(path, checker, tmp_path):
    shipped = DEPLOY / path
    out = tmp_path / "written"
    done = subprocess.run([sys.executable, "-m", "enserve", *_written_by(shipped), "--output", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == shipped.read_text()
    package, binary, args = checker
    tool = apt_install(package, binary)
    if tool is None:
        pytest.skip(f"{binary} is not installed and apt-get could not install {package}")
    check = subprocess.run([tool, *args, str(shipped)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_enserve_deploy_refuses_bad_backends_without_a_traceback():
    done = subprocess.run([sys.executable, "-m", "enserve", "deploy", "haproxy", "--backend", "h:1,2,3,4"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "backend 'h:1,2,3,4': give HTTP,GRPC or HTTP,GRPC,METRICS ports" in done.stderr
    done = subprocess.run([sys.executable, "-m", "enserve", "deploy", "haproxy", "--backend", "h", "--fall", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--fall is 0, but must be at least 1" in done.stderr
    done = subprocess.run([sys.executable, "-m", "enserve", "deploy", "haproxy", "--backend", "h", "--output",
                           "/proc/enserve/haproxy.cfg"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "enserve deploy: cannot write /proc/enserve/haproxy.cfg" in done.stderr, done.stderr


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("hadolint") or str(BIN / "hadolint")
    return subprocess.run([tool, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint(tmp_path):
    done = _hadolint(DEPLOY / "docker" / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr
    sloppy = tmp_path / "Dockerfile"  # the linter really lints: an unpinned base and apt install
    sloppy.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = _hadolint(sloppy)
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3008" in done.stdout, done.stdout


def dockerfile(path: Path) -> dict[str, list[str]]:
    """Instruction -> its arguments (continuation lines joined; repeated ones concatenated)."""
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instr, _, rest = line.strip().partition(" ")
            out.setdefault(instr.upper(), []).append(rest.strip())
    return out


def manifests() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_the_kubernetes_manifests_pass_schema_validation(tmp_path):
    tool = shutil.which("kubernetes-validate") or str(BIN / "kubernetes-validate")
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    done = subprocess.run([tool, "--strict", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(manifests()) == 5, done.stdout
    broken = tmp_path / "deployment.yaml"  # the validator really validates
    broken.write_text((DEPLOY / "kubernetes" / "deployment.yaml").read_text().replace("containerPort: 8001",
                                                                                       "containerPort: grpc"))
    done = subprocess.run([tool, "--strict", str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "containerPort" in done.stdout + done.stderr


def test_the_manifests_agree_with_the_image_and_the_daemon():
    docs = manifests()
    pod = docs[("Deployment", "enserve")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    exposed = dockerfile(DEPLOY / "docker" / "Dockerfile")["EXPOSE"][0].split()
    assert sorted(map(str, ports.values())) == sorted(exposed) == ["8000", "8001", "8002"]
    assert docs[("Service", "enserve-grpc")]["spec"]["clusterIP"] == "None"  # headless: clients balance
    for name, service in docs.items():
        if name[0] == "Service":
            assert service["spec"]["selector"] == docs[("Deployment", "enserve")]["spec"]["selector"]["matchLabels"]
            assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory"
    args = container["args"]
    budget = args[args.index("--shm-budget") + 1]
    assert _mib(budget) < _mib(shm["sizeLimit"])
    claim = next(v for v in pod["volumes"] if v["name"] == "models")["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs
    assert pod["terminationGracePeriodSeconds"] > 25  # the daemon's --shutdown-timeout fits inside


def _mib(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)", size).groups()
    return int(number) * {"K": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit] / 2**20


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_the_image_entrypoint_serves_as_pid1_with_the_pods_settings(demo_repo, reference, tmp_path):
    """Outside a container (no image can be built here): the image's filesystem (its WORKDIR with the
    copied sources and ``pip install .`` of them, not the development install), the Dockerfile's
    ENTRYPOINT run in that WORKDIR with its ENV, the Deployment's args and /dev/shm size, the
    repository where the volume would be; as PID 1 of its own pid namespace. The pod's probes answer 200, the answers equal the members' mean, and
    SIGTERM stops it cleanly with its /dev/shm left empty."""
    spec = dockerfile(DEPLOY / "docker" / "Dockerfile")
    entrypoint = json.loads(spec["ENTRYPOINT"][-1])
    workdir = image_workdir(tmp_path)  # the image's own install (``pip install .`` there), run there
    python = install_plainly(workdir, tmp_path)
    env = dict(os.environ, PATH=f"{python.parent}:{os.environ['PATH']}")
    for line in spec["ENV"]:
        env.update(pair.split("=", 1) for pair in line.split())
    assert env["ENSERVE_HOST"] == "0.0.0.0" and env["ENSERVE_MODEL_REPOSITORY"] == spec["VOLUME"][0].strip('[]"')
    pod = manifests()[("Deployment", "enserve")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    http, grpc_port, metrics = launcher.free_ports(3)
    env.update(ENSERVE_MODEL_REPOSITORY=str(demo_repo), ENSERVE_HTTP_PORT=str(http),  # docker run -v, -p
               ENSERVE_GRPC_PORT=str(grpc_port), ENSERVE_METRICS_PORT=str(metrics), ENSERVE_NO_OPTIMIZE="1")
    shm = tmp_path / "shm"
    size = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
    try:
        launcher.mount_tmpfs(shm, int(_mib(size)))
    except PermissionError as exc:
        pytest.skip(f"{exc} (CI runs as root)")
    try:
        log = (tmp_path / "daemon.log").open("w")
        proc = subprocess.Popen([*launcher.container_command(shm, pid_namespace=True), *entrypoint,
                                 *container["args"]], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        server = launcher.Server(proc, grpc_port, http, metrics, tmp_path / "daemon.log")
        pid1 = launcher.namespace_pid1(proc.pid)
        try:
            server.wait_ready(90)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                path = container[probe]["httpGet"]["path"]
                with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=5) as r:
                    assert r.status == 200, (probe, path)
            x = images(4, seed=21)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            got = grpcclient.InferenceServerClient(server.grpc_url).infer("ensemble", [inp]).as_numpy("probs")
            np.testing.assert_allclose(got, reference(x), atol=1e-5)
            assert any(p.name.startswith("enserve.") for p in shm.iterdir())
        finally:
            code = server.stop(timeout=pod["terminationGracePeriodSeconds"], pid=pid1)
        assert code == 0, server.output()
        assert list(shm.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(shm)], check=True)


def image_workdir(tmp: Path) -> Path:
    """The image's WORKDIR as its Dockerfile lays it out: exactly the files its COPY lines take."""
    spec = dockerfile(DEPLOY / "docker" / "Dockerfile")
    workdir = tmp / "image" / spec["WORKDIR"][-1].lstrip("/")
    for line in spec["COPY"]:
        *sources, dest = line.split()
        for src in sources:  # relative to WORKDIR; "DEST/" takes the source's own name
            target = workdir / dest / (Path(src).name if dest.endswith("/") else "")
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / src, target)
    return workdir


def test_what_the_dockerfile_copies_builds_the_serving_package(tmp_path):
    """The image's ``pip install .`` from exactly the files its COPY lines take (minus .dockerignore)."""
    context = image_workdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheels"), str(context)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "wheels").glob("enserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("enserve/cli/serve.py", "enserve/server/daemon.py", "enserve/server/dataplane/worker.py",
                   "enserve/optimizer/placement.py", "enserve/deploy.py"):
        assert module in names, module
