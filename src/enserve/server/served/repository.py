"""Triton-layout model repository: read and write `config.pbtxt`, import ONNX members.

Layout (as Triton's): ``<repo>/<member>/config.pbtxt`` + ``<repo>/<member>/1/model.onnx`` for
every member, and ``<repo>/<ensemble>/config.pbtxt`` with ``platform: "ensemble"`` whose
``ensemble_scheduling`` steps name the members and whose parameter ``enserve.combiner`` names
the combiner.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from enserve import combiners
from enserve.optimizer.devices import parse_core_list
from enserve.server.errors import RepositoryError
from enserve.server.served.front import FRONT_PARAMETER, FrontPoint, front_text, parse_front, whole

ONNX_PLATFORM = "onnxruntime_onnx"
ENSEMBLE_PLATFORM = "ensemble"
ENTROPY_OUTPUT = "entropy"
VARIANCE_OUTPUT = "member_variance"
UNCERTAINTY_OUTPUTS = (ENTROPY_OUTPUT, VARIANCE_OUTPUT)
# an ensemble with a front: per row, which of its members (in step order) the answer combined
MEMBERS_OUTPUT = "members_used"
RESERVED_OUTPUTS = (*UNCERTAINTY_OUTPUTS, MEMBERS_OUTPUT)
CONFIG_OBJECTIVE = "enserve.objective_ms"  # an ensemble's default latency objective
SPEC_PARAMETERS = ("enserve.combiner", "enserve.weights", FRONT_PARAMETER, CONFIG_OBJECTIVE)  # the rest: notes
INPUT_NOTE, CLASSES_NOTE = "enserve.input", "enserve.classes"  # what the input expects; the outputs' classes
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_BATCH_SIZE = 32  # what a member runs at when its config names no preferred batch size
DEFAULT_ENSEMBLE = "ensemble"  # the name of the ensemble a repository is built with, unless told
NAME_CHARS = r"A-Za-z0-9_.\-"  # what a model name is made of
MODEL_NAME = re.compile(rf"[A-Za-z0-9_][{NAME_CHARS}]*\Z")  # no path: no '/', no leading '.' or '-'
MAX_NAME_CHARS = 200  # a model's folder name, with room below the file systems' 255 bytes


def check_model_name(name: str) -> str:
    """``name`` if it can only be a model name (letters, digits, '_', '.' and '-'; no path, no '..';
    at most ``MAX_NAME_CHARS``); else RepositoryError, which the registry turns into INVALID_ARGUMENT."""
    if not MODEL_NAME.match(name) or ".." in name:
        raise RepositoryError(f"model name {name!r} is not a name: use letters, digits, '_', '.' and '-', "
                              "no path")
    if len(name) > MAX_NAME_CHARS:
        raise RepositoryError(f"model name {name[:40]!r}... has {len(name)} characters; at most {MAX_NAME_CHARS}")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: Triton datatype and the dims after the batch axis."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(triton_to_np_dtype(self.datatype))

    @property
    def row_elements(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64))

    @property
    def row_bytes(self) -> int:
        return self.row_elements * self.np_dtype.itemsize


@dataclass(frozen=True)
class MemberSpec:
    """A member model: an ONNX file, and the placement its ``config.pbtxt`` asks for (the served
    placement is resolved from this, a plan and the flags: ``server.placement``)."""

    name: str
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    batch_size: int = DEFAULT_BATCH_SIZE
    queue_delay_us: int = 0
    devices: tuple[str, ...] = ("cpu",)  # one per instance: Triton's instance_group count x gpus
    cpu_cores: tuple[int, ...] | None = None
    worker_group: str | None = None  # members naming the same group share worker processes


@dataclass
class EnsembleSpec:
    """An ensemble: members averaged with a combiner; it has the members' inputs and outputs."""

    name: str
    members: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    combiner: str = combiners.DEFAULT
    weights: tuple[float, ...] | None = None  # a weighted combiner's: one per member, summing to 1
    notes: dict[str, str] = field(default_factory=dict)  # the config's other parameters, kept as they are
    front: tuple[FrontPoint, ...] = ()  # nested subsets of members, cheapest first (``front``); () = all members
    objective_ms: float | None = None  # its default latency objective (``enserve.objective_ms``)

    def points(self) -> tuple[FrontPoint, ...]:
        """Its front, or the one point of all its members when it names none."""
        return self.front or whole(self.members)

    def weight_of(self) -> dict[str, float]:
        """Each member's weight (1/n each for the plain mean)."""
        w = self.weights or tuple(1.0 / len(self.members) for _ in self.members)
        return dict(zip(self.members, w))


@dataclass
class Repository:
    path: Path
    members: dict[str, MemberSpec] = field(default_factory=dict)
    ensembles: dict[str, EnsembleSpec] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading ONNX


def _onnx_tensor_specs(values, initializers: set[str], where: str) -> list[TensorSpec]:
    import onnx

    specs = []
    for value in values:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        dims = list(ttype.shape.dim)
        if not dims:
            raise RepositoryError(f"{where}: tensor '{value.name}' is a scalar; a batch axis is required")
        first = dims[0]
        if first.HasField("dim_value") and first.dim_value > 0:
            raise RepositoryError(
                f"{where}: tensor '{value.name}' has a fixed first dimension {first.dim_value}; "
                "export it with a dynamic batch axis"
            )
        rest = []
        for i, d in enumerate(dims[1:], start=1):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                raise RepositoryError(
                    f"{where}: tensor '{value.name}' dimension {i} is dynamic ('{d.dim_param}'); "
                    "only the batch axis may be dynamic"
                )
            rest.append(int(d.dim_value))
        specs.append(TensorSpec(value.name, np_to_triton_dtype(np_dtype), tuple(rest)))
    return specs


def read_onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file (batch axis dropped); raises on what we cannot serve."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for corrupt files
        raise RepositoryError(f"{path}: not a readable ONNX model ({exc})") from exc
    inits = {t.name for t in model.graph.initializer}
    inputs = _onnx_tensor_specs(model.graph.input, inits, str(path))
    outputs = _onnx_tensor_specs(model.graph.output, set(), str(path))
    return inputs, outputs


# ----------------------------------------------------------------------------- config.pbtxt


def _dtype_enum(datatype: str) -> int:
    return mc.DataType.Value("TYPE_" + ("STRING" if datatype == "BYTES" else datatype))


def _dtype_name(enum_value: int) -> str:
    name = mc.DataType.Name(enum_value).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _add_tensors(repeated, specs: list[TensorSpec]) -> None:
    for s in specs:
        t = repeated.add()
        t.name = s.name
        t.data_type = _dtype_enum(s.datatype)
        t.dims.extend(s.dims)


def _tensors(repeated) -> list[TensorSpec]:
    return [TensorSpec(t.name, _dtype_name(t.data_type), tuple(int(d) for d in t.dims)) for t in repeated]


def member_config(spec: MemberSpec, devices: tuple[str, ...] | None = None, batch_size: int | None = None,
                  queue_delay_us: int | None = None, cpu_cores: tuple[int, ...] | None = None,
                  worker_group: str | None = None) -> mc.ModelConfig:
    """Triton's config of a member: what ``spec`` asks for, or the placement given (one instance per
    device: CPU instances in one KIND_CPU group, each GPU in a KIND_GPU group of its own)."""
    devices = spec.devices if devices is None else devices
    cfg = mc.ModelConfig(name=spec.name, platform=ONNX_PLATFORM, max_batch_size=spec.max_batch_size)
    _add_tensors(cfg.input, spec.inputs)
    _add_tensors(cfg.output, spec.outputs)
    cpus = sum(1 for d in devices if not d.startswith("gpu"))
    if cpus:
        cfg.instance_group.add(count=cpus, kind=mc.ModelInstanceGroup.KIND_CPU)
    for gpu in sorted({d for d in devices if d.startswith("gpu")}):
        cfg.instance_group.add(count=devices.count(gpu), kind=mc.ModelInstanceGroup.KIND_GPU,
                               gpus=[int(gpu.partition(":")[2] or 0)])
    cfg.dynamic_batching.preferred_batch_size.append(spec.batch_size if batch_size is None else batch_size)
    cfg.dynamic_batching.max_queue_delay_microseconds = spec.queue_delay_us if queue_delay_us is None else queue_delay_us
    cores = spec.cpu_cores if cpu_cores is None else cpu_cores
    if cores:
        cfg.parameters["enserve.cpu_cores"].string_value = ",".join(map(str, cores))
    group = spec.worker_group if worker_group is None else worker_group
    if group:
        cfg.parameters["enserve.worker_group"].string_value = group
    return cfg


def ensemble_config(spec: EnsembleSpec, members: dict[str, MemberSpec]) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=spec.name, platform=ENSEMBLE_PLATFORM, max_batch_size=spec.max_batch_size)
    _add_tensors(cfg.input, spec.inputs)
    _add_tensors(cfg.output, spec.outputs)
    for name in spec.members:
        step = cfg.ensemble_scheduling.step.add()
        step.model_name = name
        step.model_version = -1
        for t in members[name].inputs:
            step.input_map[t.name] = t.name
        for t in members[name].outputs:
            step.output_map[t.name] = f"{name}.{t.name}"
    cfg.parameters["enserve.combiner"].string_value = spec.combiner
    if spec.weights is not None:
        cfg.parameters["enserve.weights"].string_value = ",".join(f"{w:.17g}" for w in spec.weights)
    if spec.front:
        cfg.parameters[FRONT_PARAMETER].string_value = front_text(spec.front)
    if spec.objective_ms is not None:
        cfg.parameters[CONFIG_OBJECTIVE].string_value = f"{spec.objective_ms:g}"
    for key, value in spec.notes.items():
        cfg.parameters[key].string_value = value
    return cfg


def parse_weights(text: str, members: list[str], where: str) -> tuple[float, ...]:
    """'0.5,0.25,0.25' as one weight per member, normalised to sum to 1; errors name the rule."""
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise RepositoryError(f"{where}: enserve.weights '{text}' is not a comma-separated list of numbers") from None
    if len(weights) != len(members):
        raise RepositoryError(f"{where}: enserve.weights has {len(weights)} values for {len(members)} members "
                              f"{members}; give one per member, in step order")
    if any(not (w >= 0 and w < float("inf")) for w in weights) or sum(weights) <= 0:
        raise RepositoryError(f"{where}: enserve.weights {weights} must be finite, >= 0 and not all 0")
    total = sum(weights)
    return tuple(w / total for w in weights)


def write_config(directory: Path, cfg: mc.ModelConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def read_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path}: not a valid Triton config.pbtxt ({exc})") from exc


# ----------------------------------------------------------------------------- loading


def _latest_version_dir(model_dir: Path) -> Path | None:
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def _member_from_config(model_dir: Path, cfg: mc.ModelConfig) -> MemberSpec:
    version = _latest_version_dir(model_dir)
    filename = cfg.default_model_filename or "model.onnx"
    if version is None or not (version / filename).is_file():
        raise RepositoryError(f"member '{cfg.name}': no model file {model_dir}/<version>/{filename}")
    if cfg.max_batch_size <= 0:
        raise RepositoryError(
            f"member '{cfg.name}': max_batch_size is {cfg.max_batch_size}, but must be > 0 "
            "(enserve batches along the first axis)"
        )
    devices: list[str] = []
    for group in cfg.instance_group or [mc.ModelInstanceGroup()]:
        count = group.count or 1
        if count < 1:
            raise RepositoryError(f"member '{cfg.name}': instance_group count {group.count}, but must be >= 1")
        if group.kind == mc.ModelInstanceGroup.KIND_GPU:
            devices += [f"gpu:{g}" for g in (group.gpus or [0]) for _ in range(count)]
        else:
            devices += ["cpu"] * count
    cores = None
    if "enserve.cpu_cores" in cfg.parameters:
        cores = parse_cores(cfg.parameters["enserve.cpu_cores"].string_value)
    batching = cfg.dynamic_batching
    batch = max(batching.preferred_batch_size) if batching.preferred_batch_size else DEFAULT_BATCH_SIZE
    return MemberSpec(
        name=cfg.name,
        path=version / filename,
        inputs=_tensors(cfg.input),
        outputs=_tensors(cfg.output),
        max_batch_size=cfg.max_batch_size,
        batch_size=min(batch, cfg.max_batch_size),
        queue_delay_us=int(batching.max_queue_delay_microseconds),
        devices=tuple(devices),
        cpu_cores=cores,
        worker_group=(cfg.parameters["enserve.worker_group"].string_value or None)
        if "enserve.worker_group" in cfg.parameters else None,
    )


def parse_cores(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3)."""
    try:
        return parse_core_list(text)
    except ValueError as exc:
        raise RepositoryError(str(exc)) from None


def load_repository(path: Path) -> Repository:
    """Read every model of a repository and check each ensemble against its members; the first
    model that cannot be read is an error (start-up, import, the allocator)."""
    return read_repository(path, strict=True)[0]


def read_repository(path: Path, *, strict: bool = False) -> tuple[Repository, dict[str, str]]:
    """The models of a repository, and per folder that cannot be read (a config that does not parse
    or names another model, an unsupported platform, an ensemble whose members are missing or
    disagree) why: such a folder is left out, and so is an ensemble over it. ``strict`` raises at the
    first one instead. Poll mode reads this way, so one bad folder does not stop the others."""
    path = Path(path)
    if not path.is_dir():
        raise RepositoryError(f"model repository '{path}' does not exist or is not a directory")
    repo = Repository(path=path)
    problems: dict[str, str] = {}

    def skip(folder: str, error: RepositoryError) -> None:
        if strict:
            raise error
        problems[folder] = error.message

    ensemble_cfgs = []
    for model_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        cfg_path = model_dir / "config.pbtxt"
        if not cfg_path.is_file():
            continue
        try:
            check_model_name(model_dir.name)  # the name model control would refuse is not served either
            cfg = read_config(cfg_path)
            if not cfg.name:
                cfg.name = model_dir.name
            if cfg.name != model_dir.name:
                raise RepositoryError(f"{cfg_path}: name '{cfg.name}' differs from its directory '{model_dir.name}'")
            if cfg.platform == ENSEMBLE_PLATFORM:
                ensemble_cfgs.append(cfg)
            elif cfg.platform == ONNX_PLATFORM or cfg.backend == "onnxruntime":
                repo.members[cfg.name] = _member_from_config(model_dir, cfg)
            else:
                raise RepositoryError(
                    f"{cfg_path}: platform '{cfg.platform or cfg.backend}' is not supported; "
                    f"expected '{ONNX_PLATFORM}' or '{ENSEMBLE_PLATFORM}'"
                )
        except RepositoryError as exc:
            skip(model_dir.name, exc)
    for cfg in ensemble_cfgs:
        try:
            repo.ensembles[cfg.name] = _ensemble_from_config(cfg, repo, path)
        except RepositoryError as exc:
            skip(cfg.name, exc)
    if not repo.members and (strict or not problems):
        raise RepositoryError(f"model repository '{path}' holds no model (no */config.pbtxt)")
    return repo, problems


def _ensemble_from_config(cfg, repo: Repository, path: Path) -> EnsembleSpec:
    names = [s.model_name for s in cfg.ensemble_scheduling.step]
    missing = [n for n in names if n not in repo.members]
    if missing:
        raise RepositoryError(f"ensemble '{cfg.name}': members {missing} are not in {path}")
    if not names:
        raise RepositoryError(f"ensemble '{cfg.name}': it names no members")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RepositoryError(f"ensemble '{cfg.name}': members {twice} appear in more than one step")
    combiner = cfg.parameters["enserve.combiner"].string_value if "enserve.combiner" in cfg.parameters \
        else combiners.DEFAULT
    try:
        rule = combiners.get(combiner)
    except ValueError as exc:
        raise RepositoryError(f"ensemble '{cfg.name}': {exc}") from None
    weights = None
    if rule.weighted:
        if "enserve.weights" not in cfg.parameters:
            raise RepositoryError(f"ensemble '{cfg.name}': combiner '{combiner}' needs parameter "
                                  "enserve.weights (one weight per member, in step order)")
        weights = parse_weights(cfg.parameters["enserve.weights"].string_value, names, f"ensemble '{cfg.name}'")
    elif "enserve.weights" in cfg.parameters:
        weighted = combiners.weighted()
        raise RepositoryError(f"ensemble '{cfg.name}': combiner '{combiner}' takes no weights, but the config sets "
                              f"enserve.weights; use one of {weighted}, or remove the weights")
    front = parse_front(cfg.parameters[FRONT_PARAMETER].string_value, names, f"ensemble '{cfg.name}'") \
        if FRONT_PARAMETER in cfg.parameters else ()
    if weights is not None:
        weight = dict(zip(names, weights))
        for i, p in enumerate(front):
            if sum(weight[m] for m in p.members) <= 0:
                raise RepositoryError(f"ensemble '{cfg.name}': {FRONT_PARAMETER} point {i} ({list(p.members)}) has "
                                      "members whose enserve.weights sum to 0: it could not answer")
    objective = None
    if CONFIG_OBJECTIVE in cfg.parameters:
        text = cfg.parameters[CONFIG_OBJECTIVE].string_value
        try:
            objective = float(text)
        except ValueError:
            objective = math.nan
        if not math.isfinite(objective) or objective <= 0:
            raise RepositoryError(f"ensemble '{cfg.name}': {CONFIG_OBJECTIVE} is '{text}', but must be a number of "
                                  "milliseconds > 0")
    members = [repo.members[n] for n in names]
    check_compatible(members)
    if rule.over_classes:
        for t in members[0].outputs:
            if all(d > 0 for d in t.dims) and math.prod(t.dims) < 2:
                raise RepositoryError(
                    f"ensemble '{cfg.name}': combiner '{combiner}' reads each output as a probability vector over "
                    f"classes, but output '{t.name}' has {math.prod(t.dims)} value(s) a sample (dims {list(t.dims)}); "
                    f"use '{combiners.DEFAULT}' for it")
    return EnsembleSpec(
        name=cfg.name,
        members=names,
        inputs=list(members[0].inputs),
        outputs=ensemble_outputs(members[0].outputs, len(names) if len(front) > 1 else 0),
        max_batch_size=min([cfg.max_batch_size or DEFAULT_MAX_BATCH_SIZE] + [m.max_batch_size for m in members]),
        combiner=combiner,
        weights=weights,
        notes={k: v.string_value for k, v in cfg.parameters.items() if k not in SPEC_PARAMETERS},
        front=front,
        objective_ms=objective,
    )


def ensemble_members(repo: Repository, ensemble: str | None) -> tuple[str, list[str]]:
    """The ensemble named (or the only one) and its members' names; RepositoryError naming the choices."""
    if ensemble is None:
        if len(repo.ensembles) != 1:
            raise RepositoryError(
                f"the repository has ensembles {sorted(repo.ensembles)}; name one with --ensemble"
            )
        ensemble = next(iter(repo.ensembles))
    if ensemble not in repo.ensembles:
        raise RepositoryError(f"unknown ensemble '{ensemble}'; the repository has {sorted(repo.ensembles)}")
    return ensemble, list(repo.ensembles[ensemble].members)


def ensemble_outputs(member_outputs: list[TensorSpec], answering_members: int = 0) -> list[TensorSpec]:
    """The members' outputs (combined) plus one uncertainty value per sample of each kind; with
    ``answering_members`` (an ensemble whose front lets it answer with some of them), a BOOL per
    member and sample saying which members the answer combined (``MEMBERS_OUTPUT``)."""
    outputs = list(member_outputs) + [TensorSpec(n, "FP32", (1,)) for n in UNCERTAINTY_OUTPUTS]
    return outputs + ([TensorSpec(MEMBERS_OUTPUT, "BOOL", (answering_members,))] if answering_members else [])


def check_compatible(members: list[MemberSpec]) -> None:
    """Members of one ensemble must agree on input/output names, dtypes and dims."""
    ref = members[0]
    for m in members[1:]:
        for kind, a, b in (("inputs", ref.inputs, m.inputs), ("outputs", ref.outputs, m.outputs)):
            if [t.name for t in a] != [t.name for t in b]:
                raise RepositoryError(
                    f"member '{m.name}' ({m.path}) has {kind} {[t.name for t in b]}, "
                    f"but '{ref.name}' has {[t.name for t in a]}"
                )
            for ta, tb in zip(a, b):
                if ta.datatype != tb.datatype or ta.dims != tb.dims:
                    raise RepositoryError(
                        f"member '{m.name}' ({m.path}): '{tb.name}' is {tb.datatype}{list(tb.dims)}, "
                        f"but '{ref.name}' has {ta.datatype}{list(ta.dims)} (batch axis omitted)"
                    )
    for t in ref.outputs:
        if t.name in RESERVED_OUTPUTS:
            raise RepositoryError(f"member output name '{t.name}' is reserved for the ensemble's own outputs "
                                  f"{list(RESERVED_OUTPUTS)}")
        if t.datatype not in ("FP32", "FP16", "FP64"):
            raise RepositoryError(f"output '{t.name}' is {t.datatype}; averaging needs a floating-point output")
