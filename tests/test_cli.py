"""The command line: every subcommand's exit code on a bad flag or value (2) and on a failure while
working (1), the serve flags generated 1:1 from ServeOptions with their ENSERVE_<FLAG> fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from enserve import __version__
from enserve.cli import parser
from enserve.cli.serve import env_name, options_from
from enserve.server.config import ServeOptions
from tests.conftest import ROOT

SUBCOMMANDS = ["serve", "import", "init-demo", "bench", "allocate", "build", "select"]


def enserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enserve", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_an_unknown_flag_is_a_usage_error(command):
    out = enserve(command, "--no-such-flag")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("usage: enserve") and "error:" in out.stderr  # argparse: usage and why


@pytest.mark.parametrize("args, env, message", [
    (["serve", "--http-port", "eighty"], {}, "--http-port: 'eighty' is not an integer"),
    (["serve"], {"ENSERVE_GRPC_PORT": "x"}, "environment variable ENSERVE_GRPC_PORT='x'"),
    (["serve", "--grpc-transport", "carrier-pigeon"], {}, "invalid choice: 'carrier-pigeon'"),
    (["serve", "--load-model", "ensemble"], {}, "--load-model needs --model-control-mode explicit"),
    (["serve", "--tls-cert", "cert.pem"], {}, "TLS needs both --tls-cert and --tls-key"),
    (["serve", "--batch-size", "0"], {}, "--batch-size is 0, but must be >= 1"),
    (["serve", "--request-timeout", "0"], {}, "--request-timeout is 0.0, but must be > 0"),
    (["serve"], {"ENSERVE_MAX_INFLIGHT": "0"}, "--max-inflight is 0, but must be >= 1"),
    (["serve"], {"ENSERVE_NO_OPTIMIZE": "maybe"}, "environment variable ENSERVE_NO_OPTIMIZE='maybe' is not one of"),
    (["init-demo", "--model-repository", "r", "--widths", "a,b"], {}, "'a,b' is not a comma-separated list"),
    (["allocate", "--batch-sizes", "x"], {}, "'x' is not a comma-separated list of integers"),
    (["build", "--model-repository", "r", "--time-budget", "5q"], {}, "duration '5q' is invalid"),
    (["bench", "--concurrency", "1,two"], {}, "'1,two' is not a comma-separated list"),
    (["bench", "--repeat", "0"], {}, "--repeat: must be an integer >= 1, not '0'"),
    (["allocate", "--max-combi", "many"], {}, "--max-combi: 'many' is not an integer"),
    (["allocate", "--max-combi", "0"], {}, "--max-combi is 0, but must be >= 1"),
    (["allocate", "--bench", "cost", "--optimize-metric", "latency"], {}, "--bench cost predicts throughput only"),
    (["allocate", "--bench-concurrency", "0"], {}, "--bench-concurrency is 0, but must be >= 1"),
    (["allocate", "--optimize-time", "nan"], {}, "--optimize-time is nan, but must be > 0"),
    (["import", "m.onnx", "--batch-size", "0"], {}, "--batch-size is 0, but must be >= 1"),
    (["import", "m.onnx", "--max-queue-delay-us", "-1"], {}, "--max-queue-delay-us is -1, but must be >= 0"),
    (["import", "m.onnx", "--ensemble", "../up"], {}, "--ensemble: model name '../up' is not a name"),
    (["import", "m.onnx"], {"ENSERVE_FRONT_ORDER": " "}, "--front-order is empty"),
    (["import", "m.onnx", "--batch-size", "9", "--max-batch-size", "4"], {}, "--batch-size is 9, above --max-batch-size 4"),
    (["import", "a.onnx", "b.onnx", "--front-order", "a,,b"], {}, "--front-order 'a,,b': the front's order ['a', '', 'b'] must name every member once"),
    (["import", "a.onnx", "b.onnx", "--front-order", "a,a"], {}, "must name every member once: ['a', 'b']"),
    (["import", "m.onnx", "--ensemble", "e" * 201], {}, "has 201 characters; at most 200"),
    (["select", "--ensemble", "e" * 300], {}, "has 300 characters; at most 200"),
    (["select", "--ensemble", "a/b"], {}, "--ensemble: model name 'a/b' is not a name"),
])
def test_bad_values_are_usage_errors_that_name_the_flag(args, env, message):
    out = enserve(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr, out.stderr


def test_failures_while_working_exit_1(tmp_path):
    (tmp_path / "notonnx.onnx").write_text("not a model")
    cases = [
        (["serve", "--model-repository", str(tmp_path / "missing")], "missing"),
        (["import", str(tmp_path / "notonnx.onnx"), "--model-repository", str(tmp_path / "r")], "notonnx.onnx"),
        (["allocate", "--model-repository", str(tmp_path / "missing")], "missing"),
        (["select", "--library", str(tmp_path / "nolib"), "--model-repository", str(tmp_path / "r")], "nolib"),
    ]
    for args, named in cases:
        out = enserve(*args)
        assert out.returncode == 1, (args, out.stderr[-2000:])
        assert named in out.stderr, (args, out.stderr[-2000:])


def test_version():
    out = enserve("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"enserve {__version__}"


def test_serve_flags_are_the_options_one_to_one_with_environment_fallbacks(tmp_path):
    serve = parser()._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest: a.option_strings[0] for a in serve._actions if a.option_strings and a.dest != "help"}
    assert set(flags) == {f.name for f in fields(ServeOptions)}
    args = parser().parse_args(["serve", "--http-port", "9000", "--no-optimize", "--cpu-cores", "0"])
    token = tmp_path / "token"
    token.write_text("secret-token-1\n")
    env = {"ENSERVE_HTTP_PORT": "7000", "ENSERVE_GRPC_PORT": "7001", "ENSERVE_LOAD_MODEL": "a,b",
           "ENSERVE_MODEL_CONTROL_MODE": "explicit", "ENSERVE_ALLOW_CLIENT_SHM": "yes",
           "ENSERVE_ADMIN_TOKEN_FILE": str(token), "ENSERVE_AUTH_TOKEN": "user-token-9"}
    options = options_from(args, env)
    assert options.http_port == 9000  # the flag wins over the environment
    assert options.grpc_port == 7001 and options.load_model == ("a", "b") and options.allow_client_shm
    assert options.optimize is False and options.cpu_cores == (0,)
    assert options.admin_token == "secret-token-1" and options.auth_token == "user-token-9"
    assert options.metrics_port == ServeOptions().metrics_port  # neither: the default
    assert env_name("--max-queue-delay-us") == "ENSERVE_MAX_QUEUE_DELAY_US"
