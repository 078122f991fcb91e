"""Serving options: one keyword-only object; CLI flags map 1:1 onto its fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class ServeOptions:
    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    grpc_transport: str = "auto"  # "native" (pygrpc-native's front), "grpcio", or auto: native unless TLS
    batch_size: int | None = None  # overrides every member's planned batch size
    queue_delay_us: int | None = None  # overrides every member's max queue delay
    max_adaptive_wait_us: int = 4000  # under load, fast members wait up to this to batch (0: off)
    device: str | None = None  # overrides every member's device: "cpu" or "gpu:<i>"
    cpu_cores: tuple[int, ...] | None = None  # the CPU device's cores (default: all)
    threads_per_member: int | None = None  # ONNX Runtime intra-op threads (default: cores / members)
    arena_mib: int = 64  # shared input ring size per input signature
    max_inflight: int = 1024  # requests in flight per model before RESOURCE_EXHAUSTED
    request_timeout_s: float = 60.0  # server-side bound on any request
    allow_client_shm: bool = False  # Triton's system shared-memory extension
    max_request_bytes: int = 256 << 20  # larger gRPC messages / HTTP bodies are refused
    tls_cert: Path | None = None  # PEM; with tls_key, gRPC, HTTP and metrics speak TLS
    tls_key: Path | None = None
    auth_token: str | None = None  # bearer token for every call but health probes
    admin_token: str | None = None  # bearer token for shared-memory registration and other admin calls
    model_control_mode: str = "none"  # Triton's: none | explicit | poll
    load_model: tuple[str, ...] = ()  # explicit mode: what to load at start ("*": everything)
    repository_poll_secs: float = 15.0  # poll mode: how often the repository is re-read
    startup_timeout_s: float = 180.0
    drain_timeout_s: float = 30.0
    # the allocator at start-up (paper §2.4); manual placement flags above switch it off
    optimize: bool = True
    plan_path: Path | None = None  # force this plan
    cpu_devices: str | None = None  # e.g. "0;1": two CPU devices of one core each
    max_combi: int = 12
    optimize_time_s: float = 120.0
    optimize_metric: str = "throughput"
    bench_concurrency: int = 16  # the real bench's load: requests in flight ...
    bench_images: int = 8  # ... of this many images each

    @property
    def manual_placement(self) -> bool:
        return self.device is not None or self.cpu_cores is not None or self.batch_size is not None


TRANSPORTS = ("auto", "native", "grpcio")


def transport_for(requested: str, tls: bool) -> str:
    """The gRPC server to run: 'auto' is the native one unless TLS is asked for (it has none)."""
    if requested not in TRANSPORTS:
        raise ValueError(f"gRPC transport '{requested}' is not one of {TRANSPORTS}")
    if requested == "native" and tls:
        raise ValueError("the native gRPC transport has no TLS: use --grpc-transport grpcio (or auto) with "
                         "--tls-cert/--tls-key")
    if requested == "auto":
        return "grpcio" if tls else "native"
    return requested
