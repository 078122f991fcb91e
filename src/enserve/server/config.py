"""Serving options: one keyword-only object; ``enserve serve`` generates its flags from the fields, 1:1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from enserve.deploy import DEFAULT_PORTS
from enserve.optimizer.devices import parse_core_list
from enserve.optimizer.profiles import DEFAULT_BATCH_SIZES
from enserve.optimizer.search import BENCHES, COST_MAX_COMBI, METRICS, REAL_MAX_COMBI
from enserve.options import check_fields, option

DEFAULT_MODEL_REPOSITORY = Path("model_repository")  # where every command reads or writes it, unless told

TRANSPORTS = ("auto", "native", "grpcio")
MODEL_CONTROL_MODES = ("none", "explicit", "poll")  # Triton's


def read_token(path: str) -> str:
    """A bearer token from a file (not the command line, which every user of the machine can read)."""
    token = Path(path).read_text().strip()
    check_token(token, path)
    return token


def check_token(token: str, where: str) -> str:
    if len(token) < 8 or any(c.isspace() for c in token):
        raise ValueError(f"the token from {where} must be at least 8 characters without spaces")
    return token


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from '67108864', '64M', '64MiB', '1.5G' (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in SIZE_UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"'{text}' is not a size: give bytes, or a number with K, M or G (e.g. 48M)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"size '{text}' must be a finite number >= 0")
    return int(value * SIZE_UNITS[unit])


def _sizes(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32): batch sizes, each >= 1."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"'{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise ValueError(f"batch sizes {text} must each be >= 1")
    return values


@dataclass(kw_only=True)
class AllocateOptions:
    """The allocator's knobs (paper §2.4): ``enserve allocate`` takes them, and ``enserve serve``
    (whose options extend these) runs the allocator with them at start-up."""

    cpu_devices: str | None = option(None, "--cpu-devices", "CPU devices as core sets, e.g. '0;1' (two devices "
                                     "of one core) or '0-1' (default: all cores but core 0 on machines with 4 or "
                                     "more, else all)", str)
    optimize_metric: str = option(METRICS[0], "--optimize-metric", "what the search maximises: images/s, or "
                                  "minus the p99 latency under the bench load", str, choices=METRICS)
    bench: str = option(BENCHES[0], "--bench", "what scores an allocation: the real pipeline measured, or the "
                        "cost model from the profiles (throughput only)", str, choices=BENCHES)
    max_combi: int | None = option(None, "--max-combi", "most allocations the search scores", int, minimum=1,
                                   shown=f"{REAL_MAX_COMBI} measured on the real bench, {COST_MAX_COMBI} computed "
                                         "by the cost model")
    optimize_time_s: float = option(120.0, "--optimize-time", "time budget of the search in seconds", float, above=0)
    batch_sizes: tuple[int, ...] = option(DEFAULT_BATCH_SIZES, "--batch-sizes", "batch sizes the search may "
                                          "choose from, e.g. 1,8,32,64", _sizes)
    start_batch: int = option(32, "--start-batch", "every group's batch size in the start allocation", int, minimum=1)
    bench_concurrency: int = option(16, "--bench-concurrency", "the real bench's load: requests kept in flight",
                                    int, minimum=1)
    bench_images: int = option(8, "--bench-images", "the real bench's load: images per request", int, minimum=1)
    bench_seconds: float = option(1.5, "--bench-seconds", "seconds the real bench measures each allocation",
                                  float, above=0)

    @property
    def combi_limit(self) -> int:
        """``max_combi``, or the bench's own limit when none was given."""
        if self.max_combi is not None:
            return self.max_combi
        return COST_MAX_COMBI if self.bench == "cost" else REAL_MAX_COMBI

    def validate(self) -> None:
        check_fields(self)
        if self.bench == "cost" and self.optimize_metric != "throughput":
            raise ValueError("--bench cost predicts throughput only: use --optimize-metric throughput")


@dataclass(kw_only=True)
class ServeOptions(AllocateOptions):
    """What ``enserve serve`` takes: the daemon's options, and the allocator's it runs at start-up."""

    model_repository: Path = option(DEFAULT_MODEL_REPOSITORY, "--model-repository",
                                    "Triton-layout repository: <repo>/<model>/config.pbtxt + <repo>/<model>/1/model.onnx",
                                    Path)
    host: str = option("127.0.0.1", "--host", "address the three endpoints listen on", str)
    http_port: int = option(DEFAULT_PORTS[0], "--http-port", "KServe v2 HTTP/REST port", int, minimum=0)
    grpc_port: int = option(DEFAULT_PORTS[1], "--grpc-port", "KServe v2 gRPC port", int, minimum=0)
    metrics_port: int = option(DEFAULT_PORTS[2], "--metrics-port", "Prometheus metrics port (GET /metrics)", int, minimum=0)
    grpc_transport: str = option(
        "auto", "--grpc-transport", "gRPC server: 'native' (pygrpc-native's front serves ModelInfer, HTTP/2 in "
        "Rust outside the GIL; the other RPCs go to a grpcio server behind it; it reads a whole message before "
        "its size can be refused), 'grpcio' (needed for TLS; refuses an oversized message from its length), or "
        "'auto': native on a loopback --host or with an auth token (which it checks before reading a message), "
        "else grpcio", str, choices=TRANSPORTS)
    batch_size: int | None = option(None, "--batch-size", "batch size of every member (default: the plan or "
                                    "config.pbtxt)", int, minimum=1)
    queue_delay_us: int | None = option(None, "--max-queue-delay-us", "longest a member waits to fill a batch "
                                        "after its first request (default: the plan or config.pbtxt)", int, minimum=0)
    max_adaptive_wait_us: int = option(4000, "--max-adaptive-wait-us", "under concurrent load a member faster "
                                       "than the ensemble's slowest may hold requests up to this long to fill its "
                                       "batch, without delaying answers (0: off)", int, minimum=0)
    device: str | None = option(None, "--device", "place every member on this device: 'cpu' or 'gpu:<index>' "
                                "(switches the allocator off)", str)
    cpu_cores: tuple[int, ...] | None = option(None, "--cpu-cores", "cores of the CPU device, e.g. '0-1' or "
                                               "'0,2' (default: every core this process may use)", parse_core_list)
    threads_per_member: int | None = option(None, "--threads-per-member", "ONNX Runtime intra-op threads per "
                                            "member (default: cores / members sharing them)", int, minimum=1)
    arena_mib: int = option(64, "--shm-arena-mib", "shared input ring size per input signature, before "
                            "--shm-budget scales it down", int, minimum=1)
    shm_budget: int | None = option(None, "--shm-budget", "most bytes of /dev/shm the daemon reserves for its "
                                    "rings and slots, e.g. 48M (default: 80%% of what is free at start-up); "
                                    "never less than one max batch per ring and slot", parse_size, minimum=1)
    max_inflight: int = option(1024, "--max-inflight", "requests in flight per model before new ones get "
                               "RESOURCE_EXHAUSTED / HTTP 503", int, minimum=1)
    objective_ms: float | None = option(
        None, "--objective-ms", "latency objective of every ensemble that has a front (enserve.front), unless its "
        "config (enserve.objective_ms) or a request (parameter objective_ms) sets one: under load each request runs "
        "the richest front point predicted to fit it, and near it is answered with the members done (default: none)",
        float, above=0)
    request_timeout_s: float = option(60.0, "--request-timeout", "server-side bound in seconds on every request "
                                      "(a client deadline may be shorter)", float, above=0)
    http_body_timeout_s: float = option(30.0, "--http-body-timeout", "seconds an HTTP request body may take to "
                                        "arrive in full (a slow or stalled upload gets 408 and holds nothing)",
                                        float, above=0)
    allow_client_shm: bool = option(False, "--allow-client-shm", "accept system shared-memory registrations and "
                                    "tensors in them (Triton's extension)", switch=True)
    max_request_bytes: int | None = option(
        None, "--max-request-bytes", "largest gRPC message / HTTP body accepted, e.g. 8M (RESOURCE_EXHAUSTED / "
        "HTTP 413 beyond; default: from the repository at start-up, its largest request (max batch x input "
        "bytes) x2 for gRPC and x8 for JSON, plus 1 MiB)", parse_size, minimum=1)
    max_inflight_bytes: int = option(512 << 20, "--max-inflight-bytes", "request bytes all requests in flight "
                                     "may hold together, e.g. 512M (RESOURCE_EXHAUSTED / HTTP 503 beyond; never "
                                     "below the largest request)", parse_size, minimum=1)
    tls_cert: Path | None = option(None, "--tls-cert", "PEM certificate: gRPC, HTTP and metrics speak TLS", Path)
    tls_key: Path | None = option(None, "--tls-key", "PEM private key of --tls-cert", Path)
    auth_token: str | None = option(None, "--auth-token-file", "file holding a bearer token every call but health "
                                    "probes must carry (or the token itself in ENSERVE_AUTH_TOKEN)", read_token)
    admin_token: str | None = option(None, "--admin-token-file", "file holding the bearer token for admin calls: "
                                     "shared-memory (un)registration and model load/unload (or the token itself "
                                     "in ENSERVE_ADMIN_TOKEN; without it admin calls take the auth token)",
                                     read_token)
    model_control_mode: str = option(
        "none", "--model-control-mode", "Triton's: 'none' serves the whole repository and refuses load/unload; "
        "'explicit' serves the --load-model names and obeys load/unload calls (admin); 'poll' follows the "
        "repository, re-read every --repository-poll-secs", str, choices=MODEL_CONTROL_MODES)
    load_model: tuple[str, ...] = option((), "--load-model", "explicit mode: an ensemble (with its members) or "
                                         "member to serve from the start; repeat it, or '*' for everything "
                                         "(in ENSERVE_LOAD_MODEL: comma-separated)", str, repeat=True)
    repository_poll_secs: float = option(15.0, "--repository-poll-secs", "poll mode: seconds between re-reads of "
                                         "the repository", float, above=0)
    startup_timeout_s: float = option(180.0, "--startup-timeout", "seconds the workers of a model may take to "
                                      "load", float, above=0)
    worker_timeout_s: float = option(30.0, "--worker-timeout", "a worker whose oldest task has waited this long "
                                     "(or 50 batch times, if longer) is taken as hung: killed, restarted, and its "
                                     "tasks computed again", float, above=0)
    shutdown_timeout_s: float = option(25.0, "--shutdown-timeout", "the whole stop after SIGTERM/SIGINT (the drain "
                                       "included) fits in this many seconds, inside Kubernetes' 30 s grace; "
                                       "workers still running then are killed", float, above=0)
    drain_timeout_s: float = option(30.0, "--drain-timeout", "seconds SIGTERM/SIGINT waits for requests in "
                                    "flight before stopping (within --shutdown-timeout)", float, minimum=0)
    # the allocator at start-up (paper §2.4); manual placement flags above switch it off
    optimize: bool = option(True, "--no-optimize", "skip the allocator: placement from config.pbtxt (also "
                            "implied by --device, --cpu-cores, --batch-size)", switch=True)
    plan_path: Path | None = option(None, "--plan", "serve with this allocation plan (from 'enserve allocate')",
                                    Path)
    def validate(self) -> None:
        """Every choice one of its list, every number within its bounds, and the rules between options (TLS needs a certificate and
        its key, the native transport has no TLS, --load-model needs explicit model control); raises
        ValueError naming the flag, the value and the rule. Nothing is read from disk here."""
        super().validate()
        if self.cpu_cores is not None and not self.cpu_cores:
            raise ValueError("--cpu-cores names no core")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.grpc_transport == "native" and self.tls_cert is not None:
            raise ValueError("the native gRPC transport has no TLS: use --grpc-transport grpcio (or auto) with "
                             "--tls-cert/--tls-key")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError("--load-model needs --model-control-mode explicit")

    @property
    def transport(self) -> str:
        """The gRPC server this configuration runs (``transport_for``)."""
        return transport_for(self.grpc_transport, tls=self.tls_cert is not None, host=self.host,
                             token=self.auth_token is not None)

    @property
    def manual_placement(self) -> bool:
        return self.device is not None or self.cpu_cores is not None or self.batch_size is not None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def transport_for(requested: str, *, tls: bool, host: str, token: bool) -> str:
    """The gRPC server to run. 'auto' is the native front only where every caller is trusted: on a
    loopback address, or with an auth token (the front refuses a call without one from its headers,
    before reading its body); grpcio otherwise (TLS, which the native front lacks, or an open port
    without a token: the native front reads a whole message before anything can refuse one over
    --max-request-bytes, where grpc-core refuses it from its length prefix)."""
    if requested not in TRANSPORTS:
        raise ValueError(f"gRPC transport '{requested}' is not one of {TRANSPORTS}")
    if requested == "auto":
        return "native" if not tls and (host in LOOPBACK or token) else "grpcio"
    return requested
