"""Build TensorRT / TensorRT-RTX engines from ONNX: one code path for both flavours.

Library form of `imkd build-engine`, Polygraphy-style: `network_from_onnx` parses,
`dry_run` reports op coverage without building, `build_engine` builds, writes the engine
atomically plus its `NAME.engine.json` sidecar, and returns a `BuildResult` whose
`summary()` ends with the next command. All reduced precision is already explicit in the
ONNX (Q/DQ for INT8, fp16 tensors for FP16), so networks are built strongly typed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from imkd_deploy.atomic import atomic_write_bytes
from imkd_deploy.engines.flavour import (
    RTX_DEFAULT_TARGETS,
    TensorRT,
    load_tensorrt,
    make_logger,
    normalize_backend,
)
from imkd_deploy.errors import UserError

log = logging.getLogger("imkd.engines")

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]          # (min, opt, max)
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class BuildSettings:
    """Everything that changes the engine; serialised into the sidecar and the rebuild command."""

    backend: str = "tensorrt-rtx"                 # tensorrt | tensorrt-rtx
    workspace_mb: int = 1024                      # builder scratch memory limit
    profiles: dict[str, Profile] = field(default_factory=dict)   # input -> (min, opt, max)
    timing_cache: Path | None = None              # shared between builds; full TensorRT only
    compute_capabilities: tuple[str, ...] = ()    # RTX targets, e.g. ("8.6",) or ("current",); () = flavour default
    optimization_level: int = 3                   # builder_optimization_level, 0..5
    precision: str | None = None                  # what the ONNX carries; None = read its metadata
    calibration_set: Path | None = None           # the INT8 set, recorded for the rebuild command
    verbose: bool = False

    def validate(self) -> None:
        self.backend = normalize_backend(self.backend)
        if self.workspace_mb <= 0:
            raise UserError(f"workspace_mb must be > 0, got {self.workspace_mb}")
        if not 0 <= self.optimization_level <= 5:
            raise UserError(f"optimization_level must be in 0..5, got {self.optimization_level}")
        if self.precision not in (None, "fp32", "fp16", "int8"):
            raise UserError(f"precision must be fp32 | fp16 | int8, got '{self.precision}'")
        if self.compute_capabilities and self.backend != "tensorrt-rtx":
            raise UserError("compute_capabilities only apply to tensorrt-rtx (full TensorRT targets the build GPU)")
        for name, prof in self.profiles.items():
            if len(prof) != 3 or len({len(s) for s in prof}) != 1:
                raise UserError(f"profile for '{name}' must be three shapes of equal rank (min, opt, max), got {prof}")
            lo, opt, hi = prof
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise UserError(f"profile for '{name}' must satisfy min <= opt <= max per dim, got {prof}")


def parse_profile(text: str) -> tuple[str, Profile]:
    """CLI form `name:1x3x16x16:2x3x16x16:8x3x16x16` -> (name, (min, opt, max))."""
    parts = text.split(":")
    if len(parts) != 4:
        raise UserError(f"--profile must look like NAME:MINxD:OPTxD:MAXxD, got '{text}'")
    try:
        shapes = tuple(tuple(int(d) for d in p.lower().split("x")) for p in parts[1:])
    except ValueError:
        raise UserError(f"--profile dims must be integers separated by 'x', got '{text}'") from None
    return parts[0], shapes  # type: ignore[return-value]


# --------------------------------------------------------------------------- parsing
@dataclass
class ParsedNetwork:
    trt: TensorRT
    builder: object
    network: object
    parser: object
    logger: object
    plugins: dict[str, str]                    # plugin name -> version registered for this parse


def network_from_onnx(onnx_path: Path, backend: str = "tensorrt-rtx", verbose: bool = False) -> ParsedNetwork:
    """Parse an ONNX file into a strongly typed network, imkd plugins registered first."""
    from imkd_deploy.engines.plugins import register_imkd_plugins

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    trt = load_tensorrt(backend)
    _refuse_plugin_nodes_on_rtx(trt, onnx_path)
    _refuse_onnx_runtime_lowering(trt, onnx_path)
    logger = make_logger(trt, verbose)
    plugins = register_imkd_plugins(trt)           # the parser looks creators up by op + namespace
    builder = trt.module.Builder(logger)
    network = builder.create_network(trt.network_flags())
    parser = trt.module.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"{trt.backend} {trt.version} could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    return ParsedNetwork(trt, builder, network, parser, logger, plugins)


def _refuse_plugin_nodes_on_rtx(trt: TensorRT, onnx_path: Path) -> None:
    """TensorRT-RTX (checked on 1.7) cannot hold plugin layers: fail before the parser aborts.

    Its INetworkDefinition has no add_plugin_v2/add_plugin_v3, and when the ONNX parser
    meets a custom node with a registered Python IPluginV3 creator it calls create_plugin and
    then std::terminate()s inside libtensorrt_onnxparser_rtx ("terminate called without an
    active exception"), killing the process. The standard-op export builds instead.
    """
    if not trt.is_rtx:
        return
    model = onnx.load(str(onnx_path), load_external_data=False)
    custom = sorted({_op_key(n) for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        raise UserError(
            f"{onnx_path} has custom-op nodes ({', '.join(custom)}), and {trt.backend} {trt.version} cannot build "
            "plugin layers. Export the model with `imkd export --ops tensorrt` for tensorrt-rtx "
            "(plugins need NVIDIA TensorRT >= 10.6 on a GPU machine)."
        )


def _refuse_onnx_runtime_lowering(trt: TensorRT, onnx_path: Path) -> None:
    """`--ops onnx` carries BEVPool's prefix sums from block to block in float64 (a Cast to
    DOUBLE): TensorRT has no float64 tensors, and float32 carries would lose ~1e-3 to cancellation.
    Hand-made or older exports may scatter with a reduction, which TensorRT's ONNX parser
    rejects (checked on RTX 1.7: "ScatterND with reduction is not supported"). Say which
    export to use instead."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        what = None
        if node.op_type in ("ScatterND", "ScatterElements"):
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                what = f"{node.op_type}(reduction='{reduction}')"
        elif node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in node.attribute):
            what = "a Cast to float64"
        if what:
            raise UserError(
                f"{onnx_path} has {what} (node '{node.name}'), which {trt.backend} {trt.version} cannot "
                "run: it is an ONNX Runtime form (`imkd export --ops onnx`, or a hand-written export). For engines export "
                "with `--ops tensorrt` (or `--ops plugin` on NVIDIA TensorRT >= 10.6) and calibrate that model.")


def _describe_parser_error(err) -> str:
    node = f"node '{err.node_name()}' ({err.node_operator()})" if err.node_name() else f"node #{err.node()}"
    return f"{node}: {err.desc()}"


def network_inputs(network) -> dict[str, Shape]:
    return {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}


def resolve_profiles(inputs: dict[str, Shape], profiles: dict[str, Profile], onnx_path: Path) -> dict[str, Profile]:
    """A profile for every input: given ones are checked, static inputs get a fixed one."""
    unknown = set(profiles) - set(inputs)
    if unknown:
        raise UserError(f"profiles name inputs that {onnx_path.name} does not have: {sorted(unknown)} (inputs: {sorted(inputs)})")
    resolved: dict[str, Profile] = {}
    missing = []
    for name, shape in inputs.items():
        if name in profiles:
            prof = tuple(tuple(int(d) for d in s) for s in profiles[name])
            static_ok = all(d < 0 or all(s[i] == d for s in prof) for i, d in enumerate(shape))
            if len(prof[0]) != len(shape) or not static_ok:
                raise UserError(f"profile for '{name}' {prof} does not match its ONNX shape {shape} (-1 = dynamic)")
            resolved[name] = prof  # type: ignore[assignment]
        elif any(d < 0 for d in shape):
            missing.append(f"{name} {shape}")
        else:
            resolved[name] = (shape, shape, shape)
    if missing:
        raise UserError(
            f"{onnx_path.name} has dynamic inputs without an optimization profile: {', '.join(missing)}. "
            "Give one per input, e.g. --profile NAME:1x3x16x16:2x3x16x16:8x3x16x16"
        )
    return resolved


# --------------------------------------------------------------------------- dry run
@dataclass
class DryRunReport:
    onnx_path: Path
    backend: str
    trt_version: str | None
    op_counts: dict[str, int]                     # "domain::Op" (domain omitted if standard) -> count
    unsupported_ops: list[str]                    # op types the parser says it cannot import
    plugin_nodes: list[tuple[str, str, bool]]     # (node name, domain::op, creator registered?)
    parse_ok: bool | None                         # None when TensorRT is not importable here
    parse_errors: list[str]

    def summary(self) -> str:
        width = max((len(k) for k in self.op_counts), default=8)
        lines = [f"dry run: {self.onnx_path} on {self.backend} {self.trt_version or '(not installed)'}"]
        for op, n in sorted(self.op_counts.items()):
            mark = "PLUGIN" if "::" in op else ("NO" if op in self.unsupported_ops else "ok")
            lines.append(f"  {op:<{width}} x{n:<4} {mark}")
        for name, op, found in self.plugin_nodes:
            lines.append(f"  needs plugin: {name} ({op}) creator {'registered' if found else 'MISSING'}")
        verdict = {True: "parses: yes", False: "parses: NO", None: "parse not attempted"}[self.parse_ok]
        lines.append(f"  {verdict}; {sum(self.op_counts.values())} nodes, {len(self.plugin_nodes)} need plugins")
        lines.extend(f"  error: {e}" for e in self.parse_errors)
        return "\n".join(lines)


def dry_run(onnx_path: Path, settings: BuildSettings | None = None) -> DryRunReport:
    """Op coverage and plugin needs, from the ONNX alone and (if installed) TensorRT's parser."""
    settings = settings or BuildSettings()
    settings.validate()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = Counter(_op_key(n) for n in model.graph.node)
    custom = [(n.name, _op_key(n)) for n in model.graph.node if n.domain not in STANDARD_DOMAINS]
    try:
        trt = load_tensorrt(settings.backend)
    except UserError:
        return DryRunReport(onnx_path, settings.backend, None, dict(ops), [], [(a, b, False) for a, b in custom], None, [])
    from imkd_deploy.engines.plugins import find_creator, register_imkd_plugins

    register_imkd_plugins(trt)
    logger = make_logger(trt, settings.verbose)
    network = trt.module.Builder(logger).create_network(trt.network_flags())
    parser = trt.module.OnnxParser(network, logger)
    unsupported = sorted(op for op in ops if "::" not in op and not parser.supports_operator(op))
    plugin_nodes = [(name, op, find_creator(trt, op.split("::")[1]) is not None) for name, op in custom]
    try:
        _refuse_plugin_nodes_on_rtx(trt, onnx_path)
        _refuse_onnx_runtime_lowering(trt, onnx_path)
    except UserError as exc:
        return DryRunReport(onnx_path, trt.backend, trt.version, dict(ops), unsupported, plugin_nodes, False, [str(exc)])
    ok = bool(parser.parse_from_file(str(onnx_path)))
    errors = [] if ok else [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    return DryRunReport(onnx_path, trt.backend, trt.version, dict(ops), unsupported, plugin_nodes, ok, errors)


def _op_key(node) -> str:
    return node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


# --------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    backend: str
    trt_version: str
    seconds: float
    size_bytes: int
    profiles: dict[str, Profile]
    compute_capabilities: tuple[str, ...]
    timing_cache: str                             # "loaded+saved PATH" | "not used" | why it was skipped
    settings: BuildSettings

    def summary(self) -> str:
        prof = "; ".join(f"{k} {'x'.join(map(str, v[0]))}..{'x'.join(map(str, v[2]))}" for k, v in self.profiles.items())
        return "\n".join([
            f"built {self.engine_path} ({self.size_bytes / 1e6:.2f} MB) in {self.seconds:.2f} s",
            f"  backend {self.backend} {self.trt_version}, precision {self.settings.precision}, "
            f"workspace {self.settings.workspace_mb} MB, opt level {self.settings.optimization_level}",
            f"  targets compute {', '.join(self.compute_capabilities)}",
            f"  profiles {prof or '(static)'}",
            f"  timing cache: {self.timing_cache}",
            f"  sidecar {self.sidecar_path}",
            f"next: imkd infer --model {self.engine_path} --dataroot DATAROOT --version VERSION --split SPLIT",
        ])


def build_engine(onnx_path: Path, out_path: Path, settings: BuildSettings | None = None) -> BuildResult:
    """Parse, build and write `out_path` + `out_path.json` (sidecar). Works on a CPU for RTX."""
    from imkd_deploy.engines.sidecar import make_sidecar, write_sidecar

    settings = settings or BuildSettings()
    settings.validate()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    settings.precision = resolve_precision(onnx_path, settings.precision)
    t0 = time.perf_counter()
    log.info("build-engine: parsing %s with %s", onnx_path, settings.backend)
    parsed = network_from_onnx(onnx_path, settings.backend, settings.verbose)
    trt, mod = parsed.trt, parsed.trt.module
    profiles = resolve_profiles(network_inputs(parsed.network), settings.profiles, onnx_path)

    config = parsed.builder.create_builder_config()
    config.set_memory_pool_limit(mod.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.builder_optimization_level = settings.optimization_level
    if any(lo != hi for lo, _, hi in profiles.values()):
        profile = parsed.builder.create_optimization_profile()
        for name, (lo, opt, hi) in profiles.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    targets = _set_compute_capabilities(trt, config, settings.compute_capabilities)

    cache_note = "not used"
    if settings.timing_cache is not None and not trt.has_timing_cache:
        cache_note = f"skipped: {trt.backend} {trt.version} documents timing-cache calls as no-ops"
        log.info("timing cache %s", cache_note)
    with _timing_cache(trt, config, settings.timing_cache) as cache_note_used:
        cache_note = cache_note_used or cache_note
        log.info("build-engine: building (%s, precision %s)", trt.backend, settings.precision)
        serialized = parsed.builder.build_serialized_network(parsed.network, config)
    if serialized is None:
        raise UserError(f"{trt.backend} {trt.version} failed to build {onnx_path}; rerun with verbose=True for the builder log")

    atomic_write_bytes(out_path, memoryview(serialized))
    seconds = time.perf_counter() - t0
    sidecar = make_sidecar(onnx_path, out_path, trt, settings, profiles, targets, parsed.plugins)
    sidecar_path = write_sidecar(sidecar, out_path)
    log.info("build-engine: done in %.2f s", seconds)
    return BuildResult(out_path, sidecar_path, trt.backend, trt.version, seconds, out_path.stat().st_size,
                       profiles, targets, cache_note, settings)


def resolve_precision(onnx_path: Path, wanted: str | None) -> str:
    """The ONNX decides precision (strong typing); a conflicting request is an error, not a flag."""
    from imkd_deploy.engines.sidecar import onnx_provenance

    if not Path(onnx_path).is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    carried = onnx_provenance(onnx_path)["precision"] or "fp32"
    if wanted is not None and wanted != carried:
        hint = {"int8": "run `imkd calibrate --precision int8` first (or pass --int8 --set ...)",
                "fp16": "run `imkd calibrate --precision fp16` first"}.get(wanted, "pass the FP32 export")
        raise UserError(f"{onnx_path} is a {carried} model but precision {wanted} was asked for: {hint}")
    return carried


def _set_compute_capabilities(trt: TensorRT, config, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """RTX: the explicit targets (or its documented default set). Full TensorRT: the build GPU."""
    from imkd_deploy.engines.sidecar import current_compute_capability

    if not trt.is_rtx:
        cc = current_compute_capability()
        return (cc,) if cc else ("unknown",)
    if not wanted:
        return RTX_DEFAULT_TARGETS
    enum = trt.module.ComputeCapability
    supported = trt.rtx_compute_capabilities()
    if "current" in wanted:
        if len(wanted) > 1:
            raise UserError("compute capability 'current' cannot be combined with named targets")
        cc = current_compute_capability()
        if cc is None:
            raise UserError("compute capability 'current' needs a visible CUDA GPU at build time (none here); "
                            "name the target GPU's compute capability instead, e.g. --compute-capability 8.6")
        wanted = (cc,)
    members = []
    for cc in wanted:
        if cc not in supported:
            raise UserError(f"{trt.backend} {trt.version} cannot target compute capability {cc} (valid: {', '.join(supported)})"
                            + ("; its engines do not run on Hopper data-center GPUs (H100/H200): build there with "
                               "--backend tensorrt (NVIDIA TensorRT)" if cc.startswith("9.") else ""))
        members.append(getattr(enum, "SM" + cc.replace(".", "")))
    config.num_compute_capabilities = len(members)
    for i, member in enumerate(members):
        config.set_compute_capability(member, i)
    return tuple(wanted)


class _timing_cache:
    """Load the shared timing cache before the build and merge+save it after, under a file lock.

    The lock spans the build so two concurrent builds do not both write a cache that lacks
    the other's entries (TensorRT merges on set; the last writer would otherwise win).
    """

    def __init__(self, trt: TensorRT, config, path: Path | None):
        self.trt, self.config, self.path = trt, config, Path(path) if path else None
        self.lock = None

    def __enter__(self) -> str | None:
        if self.path is None or not self.trt.has_timing_cache:
            return None
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.path) + ".lock")
        self.lock.acquire()
        blob = self.path.read_bytes() if self.path.exists() else b""
        cache = self.config.create_timing_cache(blob)
        self.config.set_timing_cache(cache, ignore_mismatch=False)
        return f"{'loaded' if blob else 'created'} + saved {self.path}"

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.lock is None:
            return
        try:
            if exc_type is None:
                cache = self.config.get_timing_cache()
                if cache is not None:
                    atomic_write_bytes(self.path, memoryview(cache.serialize()))
        finally:
            self.lock.release()


