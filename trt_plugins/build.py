"""Build a TensorRT engine from a rewritten (UCM) ONNX model.

    from trt_plugins.build import EngineBuildConfig, build_engine
    result = build_engine("model-esa.onnx", "model-esa.engine", config=EngineBuildConfig(max_batch=4))

Steps (each reported through ``progress``): register the UCM plugins; check every UCM node of
the ONNX model has a registered plugin creator and all of its fields; parse into a strongly typed
network (TensorRT 10.x: ``STRONGLY_TYPED`` flag; 11.x: always strongly typed) with the AOT or JIT
plugin preference; check every UCM node became a plugin layer (not its ONNX function body);
add two optimization profiles -- 0 = prefill (chunks of 1..max_prefill_tokens tokens), 1 = decode
(one token per row, batch up to max_batch); build with a progress monitor; save the engine and a
JSON sidecar (``ENGINE.json``) describing its I/O, profiles and the model's ``ucm.*`` metadata,
which the TensorRT runtime backend reads.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from trt_plugins._tensorrt import require_tensorrt

__all__ = [
    "EngineBuildConfig",
    "EngineBuildError",
    "BuildResult",
    "build_engine",
    "profile_shapes",
    "check_ucm_nodes",
    "strip_ucm_functions",
    "plugin_override_flag",
    "resolve_sms",
    "stamp_split_plan",
    "split_counters_length",
    "PROFILE_PREFILL",
    "PROFILE_DECODE",
]

PROFILE_PREFILL, PROFILE_DECODE = 0, 1
PROFILE_NAMES = ("prefill", "decode")

# Dim roles. A dynamic dim is resolved by its dim_param name, then by the input/axis it sits on.
_ROLE_BY_NAME = {
    "batch": "batch", "batch_size": "batch", "B": "batch",
    "seq": "tokens", "seq_len": "tokens", "sequence_length": "tokens", "sequence": "tokens", "T": "tokens",
    "max_blocks": "max_blocks", "num_blocks": "num_blocks", "max_selected": "max_selected", "S": "max_selected",
    "split_counters": "split_counters",
}  # fmt: skip
_ROLE_BY_POSITION = [
    (r"input_ids|position_ids", {0: "batch", 1: "tokens"}),
    (r"seq_lens", {0: "batch"}),
    (r"block_table", {0: "batch", 1: "max_blocks"}),
    (r"kv_pool(\.\d+)?", {0: "num_blocks"}),
    (r"selection(\.\d+)?", {0: "batch", 2: "max_selected"}),
    (r"attn_split_counters|split_counters", {0: "split_counters"}),
    (r"q", {0: "batch", 2: "tokens"}),
    (r"k|v", {0: "batch", 2: "tokens"}),
]


class EngineBuildError(RuntimeError):
    """The engine could not be built; the message says which node, input or step failed."""


@dataclass(frozen=True, kw_only=True)
class EngineBuildConfig:
    """Shapes and options of the engine.

    max_batch:           rows per step (decode profile optimises for this many).
    max_prefill_tokens:  longest prefill chunk (tokens per row); opt_prefill_tokens its tuning point.
    max_blocks:          block-table width (context capacity = max_blocks * block_size).
    num_blocks:          pool blocks per layer (None = max_batch * max_blocks).
    max_selected:        selection width (None = max_blocks).
    plugin_mode:         "aot" (kernels embedded as PTX: engine runs without Python) or "jit".
    sms:                 SM count of the GPU the engine is for: the split-K attention's split count is the
                         launch rule's for it (stamped as ``num_sms`` on every split attention node, and
                         recorded in ENGINE.json). None = the CUDA device's count; a build without a CUDA
                         device (TensorRT for RTX) must give it. Only graphs with split attention nodes
                         need it. Results never depend on it; speed does (H100 SXM: 132).
    fixed_dims:          values for any other dynamic dim, by dim_param name (e.g. single-op models).
    workspace_bytes:     builder workspace pool limit (None = TensorRT default).
    """

    max_batch: int = 1
    max_prefill_tokens: int = 1024
    opt_prefill_tokens: int | None = None
    max_blocks: int = 64
    num_blocks: int | None = None
    max_selected: int | None = None
    plugin_mode: Literal["aot", "jit"] = "aot"
    sms: int | None = None
    fixed_dims: Mapping[str, int] = field(default_factory=dict)
    workspace_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_prefill_tokens", "max_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineBuildConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("opt_prefill_tokens", "num_blocks", "max_selected", "workspace_bytes", "sms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"EngineBuildConfig.{name} must be None or an int >= 1, got {v!r}")
        if self.opt_prefill_tokens is not None and self.opt_prefill_tokens > self.max_prefill_tokens:
            raise ValueError(
                f"EngineBuildConfig.opt_prefill_tokens ({self.opt_prefill_tokens}) must be <= "
                f"max_prefill_tokens ({self.max_prefill_tokens})"
            )
        if self.plugin_mode not in ("aot", "jit"):
            raise ValueError(f"EngineBuildConfig.plugin_mode must be 'aot' or 'jit', got {self.plugin_mode!r}")
        for k, v in self.fixed_dims.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"EngineBuildConfig.fixed_dims[{k!r}] must be an int >= 0, got {v!r}")

    def role_ranges(self) -> dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """(min, opt, max) of each dim role, for the prefill and the decode profile."""
        nb = self.num_blocks or self.max_batch * self.max_blocks
        ms = self.max_selected or self.max_blocks
        opt_t = self.opt_prefill_tokens or max(1, self.max_prefill_tokens // 2)
        mb = self.max_batch
        return {
            "batch": ((1, 1, mb), (1, mb, mb)),
            "tokens": ((1, opt_t, self.max_prefill_tokens), (1, 1, 1)),
            "max_blocks": ((1, self.max_blocks, self.max_blocks),) * 2,
            "num_blocks": ((1, nb, nb),) * 2,
            "max_selected": ((1, ms, ms),) * 2,
        }


def _dims(vi) -> list[int | str]:
    out: list[int | str] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or "?")
    return out


def _role(input_name: str, axis: int, param: str) -> str | None:
    if param in _ROLE_BY_NAME:
        return _ROLE_BY_NAME[param]
    for pattern, axes in _ROLE_BY_POSITION:
        if re.fullmatch(pattern, input_name) and axis in axes:
            return axes[axis]
    return None


def _split_nodes(model) -> list:
    from ucm_trt.graph.schemas import DOMAIN, SPLIT_OPS

    names = {s.name for s in SPLIT_OPS.values()}
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in names]


def split_counters_length(model, config: EngineBuildConfig) -> int:
    """Length of the ``attn_split_counters`` input in both profiles: the most counters any split
    attention node's kernel may touch at the profiles' largest batch and chunk
    (``config.max_batch`` x ``config.max_prefill_tokens``), for any tactic and tile the builder picks
    (``trt_plugins._attention.counters_needed``). One buffer of this length serves every layer."""
    from onnx import helper

    from trt_plugins._attention import counters_needed
    from trt_plugins.spec import plugin_spec

    need = 1
    for node in _split_nodes(model):
        spec = plugin_spec(node.op_type)
        values = spec.attribute_values({a.name: helper.get_attribute_value(a) for a in node.attribute})
        need = max(need, counters_needed(config.max_batch, config.max_prefill_tokens, values, spec=spec))
    return need


def resolve_sms(config: EngineBuildConfig) -> int:
    """``config.sms``, else the current CUDA device's SM count; :class:`EngineBuildError` without either."""
    if config.sms is not None:
        return config.sms
    import torch

    if not torch.cuda.is_available():
        raise EngineBuildError(
            "EngineBuildConfig.sms is None and there is no CUDA device to read the SM count from: the split-K "
            "attention plans its split count for the target GPU's SMs; pass it (ucm-trt build --sms N; H100 SXM: 132)"
        )
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)


def stamp_split_plan(model, sms: int):
    """A copy of ``model`` whose split attention nodes carry ``num_sms = sms`` (the rewriter writes 0)."""
    from onnx import helper

    out = type(model)()
    out.CopyFrom(model)
    for node in _split_nodes(out):
        keep = [a for a in node.attribute if a.name != "num_sms"]
        del node.attribute[:]
        node.attribute.extend(keep + [helper.make_attribute("num_sms", int(sms))])
    return out


def profile_shapes(model, config: EngineBuildConfig) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """``[prefill, decode]``: per network input, its ``(min, opt, max)`` shapes.

    Every dynamic dim must resolve to a role (batch, tokens, max_blocks, num_blocks, max_selected,
    split_counters: :func:`split_counters_length` in both profiles) or be given in
    ``config.fixed_dims``; otherwise :class:`EngineBuildError` names it.
    """
    initializers = {i.name for i in model.graph.initializer}
    ranges = dict(config.role_ranges())
    if _split_nodes(model):
        n = split_counters_length(model, config)
        ranges["split_counters"] = ((n, n, n),) * 2
    profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = [{}, {}]
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = _dims(vi)
        for p in range(2):
            mins, opts, maxs = [], [], []
            for axis, d in enumerate(dims):
                if isinstance(d, int):
                    lo = op = hi = d
                elif d in config.fixed_dims:
                    lo = op = hi = config.fixed_dims[d]
                else:
                    role = _role(vi.name, axis, d)
                    if role is None:
                        raise EngineBuildError(
                            f"input {vi.name!r} axis {axis} is dynamic ({d!r}) and has no range: name it in "
                            f"EngineBuildConfig.fixed_dims or use a known dim name "
                            f"({', '.join(sorted(_ROLE_BY_NAME))})"
                        )
                    if role not in ranges:  # a split_counters dim in a graph without split attention nodes
                        raise EngineBuildError(
                            f"input {vi.name!r} axis {axis} ({d!r}) is a split-K counters dim, but the model has no "
                            "split attention node to size it for; name it in EngineBuildConfig.fixed_dims"
                        )
                    lo, op, hi = ranges[role][p]
                mins.append(lo)
                opts.append(op)
                maxs.append(hi)
            profiles[p][vi.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return profiles


def check_ucm_nodes(model, registry=None) -> list[str]:
    """Check every UCM node: known op, a registered plugin creator (when ``registry`` is given),
    and every plugin field present. Returns the UCM node names; raises :class:`EngineBuildError`."""
    from trt_plugins.spec import plugin_spec
    from ucm_trt.graph.schemas import DOMAIN, SCHEMAS

    names = []
    local_functions = {(f.domain, f.name) for f in model.functions}
    for node in model.graph.node:
        if node.domain != DOMAIN and node.op_type not in SCHEMAS:
            if node.domain not in ("", "ai.onnx", "com.microsoft") and (node.domain, node.op_type) not in local_functions:
                raise EngineBuildError(
                    f"node {node.name!r} ({node.domain}::{node.op_type}) is neither a standard op nor a UCM op "
                    "and has no function body: TensorRT has no plugin for it"
                )
            continue
        if node.op_type not in SCHEMAS:
            raise EngineBuildError(
                f"node {node.name!r} is in domain {DOMAIN!r} but {node.op_type!r} is not a UCM op "
                f"({', '.join(sorted(SCHEMAS))}); no plugin exists for it"
            )
        spec = plugin_spec(node.op_type)
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ns = attrs.get("plugin_namespace", b"").decode() if isinstance(attrs.get("plugin_namespace"), bytes) else ""
        ver = attrs.get("plugin_version", b"").decode() if isinstance(attrs.get("plugin_version"), bytes) else ""
        if ns != spec.namespace or ver != spec.version:
            raise EngineBuildError(
                f"node {node.name!r} ({node.op_type}) must carry plugin_namespace={spec.namespace!r} and "
                f"plugin_version={spec.version!r} (got {ns!r}, {ver!r}); TensorRT's parser routes on them"
            )
        try:
            spec.attribute_values(attrs)
        except (TypeError, ValueError) as exc:
            raise EngineBuildError(f"node {node.name!r} ({node.op_type}): {exc}") from None
        if registry is not None and registry.get_creator(spec.name, spec.version, spec.namespace) is None:
            raise EngineBuildError(
                f"node {node.name!r} ({node.op_type}) has no registered TensorRT plugin "
                f"{spec.plugin_id} v{spec.version}; call trt_plugins.register_plugins() first"
            )
        names.append(node.name)
    return names


def strip_ucm_functions(model):
    """A copy of ``model`` without the model-local functions that carry UCM op bodies.

    The rewriter gives every UCM node a same-named ONNX local function (ONNX Runtime runs it as the
    reference). TensorRT's parser may import a node through that function instead of the plugin:
    10.15+ does so unless the node has ``plugin_namespace`` or the parser flag
    ``ENABLE_PLUGIN_OVERRIDE`` is set, and the flag does not exist before 10.15. Without the
    functions there is nothing to inline on any version, so the builder parses this copy (and also
    sets the flag where it exists). UCM nodes and every other function stay as they are.
    """
    from ucm_trt.graph.schemas import DOMAIN, SCHEMAS

    out = type(model)()
    out.CopyFrom(model)
    keep = [f for f in out.functions if not (f.domain == DOMAIN and f.name in SCHEMAS)]
    del out.functions[:]
    out.functions.extend(keep)
    return out


def plugin_override_flag(trt):
    """``trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE`` where this TensorRT has it (10.15+), else None."""
    return getattr(getattr(trt, "OnnxParserFlag", None), "ENABLE_PLUGIN_OVERRIDE", None)


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    metadata_path: Path
    plugin_layers: int
    seconds: float
    engine_bytes: int


def _progress_default(msg: str) -> None:
    print(f"[ucm-trt build] {msg}", file=sys.stderr, flush=True)


def _make_progress_monitor(trt, progress):
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):
        def __init__(self) -> None:
            base.__init__(self)
            self._phases: dict[str, tuple[int, float]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._phases[phase_name] = (num_steps, time.perf_counter())
            if parent_phase is None:
                progress(f"phase {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            n, t0 = self._phases.pop(phase_name, (0, time.perf_counter()))
            if not self._phases:
                progress(f"phase {phase_name} done in {time.perf_counter() - t0:.1f} s")

    return _Monitor()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    config: EngineBuildConfig = EngineBuildConfig(),
    progress: Callable[[str], None] = _progress_default,
) -> BuildResult:
    """Build and save an engine for the rewritten model at ``onnx_path`` (see module doc)."""
    import onnx

    if not isinstance(config, EngineBuildConfig):
        raise TypeError(f"config must be an EngineBuildConfig, got {type(config).__name__}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {str(onnx_path)!r} does not exist")
    t_start = time.perf_counter()
    trt, _ = require_tensorrt()
    from trt_plugins import register_plugins

    ids = register_plugins()
    progress(f"TensorRT {trt.__version__}: registered {len(ids)} UCM plugins ({', '.join(ids)})")

    model = onnx.load(str(onnx_path), load_external_data=False)
    ucm_nodes = check_ucm_nodes(model, trt.get_plugin_registry())
    progress(f"{onnx_path.name}: {len(model.graph.node)} nodes, {len(ucm_nodes)} UCM nodes")
    profiles = profile_shapes(model, config)
    split = len(_split_nodes(model))
    sms = resolve_sms(config) if split else None
    if split:
        progress(f"{split} split-K attention nodes: split count planned for {sms} SMs "
                 f"({'--sms' if config.sms is not None else 'the CUDA device'}), "
                 f"attn_split_counters length {profiles[0].get('attn_split_counters', ((0,),))[0][0]}")
    else:
        progress("no split-K attention nodes (a model rewritten before issue 14 or with split_scratch=False): "
                 "the engine's attention runs unsplit")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    F = trt.NetworkDefinitionCreationFlag
    flags = 0
    if hasattr(F, "STRONGLY_TYPED"):  # 10.x needs it; 11.x keeps it as a no-op
        flags |= 1 << int(F.STRONGLY_TYPED)
    pref = "PREFER_AOT_PYTHON_PLUGINS" if config.plugin_mode == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
    if not hasattr(F, pref):
        raise EngineBuildError(f"TensorRT {trt.__version__} lacks NetworkDefinitionCreationFlag.{pref} (needs >= 10.9)")
    flags |= 1 << int(getattr(F, pref))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    override = plugin_override_flag(trt)
    if override is not None:
        parser.set_flag(override)
    stripped = strip_ucm_functions(model if sms is None else stamp_split_plan(model, sms))
    progress(f"parsing {onnx_path} ({config.plugin_mode.upper()} plugins, strongly typed; "
             f"{len(model.functions) - len(stripped.functions)} UCM function bodies stripped, "
             f"plugin override flag {'set' if override is not None else 'absent (TensorRT < 10.15)'})")
    # path: where TensorRT resolves external weights (the model was loaded without them)
    if not parser.parse(stripped.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT's ONNX parser failed on {onnx_path}: {errors}")
    plugin_layers = sum(
        1 for i in range(network.num_layers)
        if network.get_layer(i).type in (getattr(trt.LayerType, "PLUGIN_V3", None), trt.LayerType.PLUGIN_V2)
    )  # fmt: skip
    if plugin_layers < len(ucm_nodes):
        raise EngineBuildError(
            f"{len(ucm_nodes)} UCM nodes but only {plugin_layers} plugin layers after parsing: TensorRT imported "
            "some UCM nodes through their ONNX function bodies instead of the plugins (are the nodes' "
            "plugin_namespace attributes present and the plugins registered?)"
        )

    bconfig = builder.create_builder_config()
    if config.workspace_bytes is not None:
        bconfig.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    for p, shapes in enumerate(profiles):
        prof = builder.create_optimization_profile()
        for name, (lo, op, hi) in shapes.items():
            prof.set_shape(name, lo, op, hi)
        bconfig.add_optimization_profile(prof)
        progress(f"profile {p} ({PROFILE_NAMES[p]}): " + ", ".join(f"{n} {lo}..{hi}" for n, (lo, _, hi) in shapes.items()))
    monitor = _make_progress_monitor(trt, progress)
    if monitor is not None:
        bconfig.progress_monitor = monitor
    progress("building (this compiles and times the plugin kernels; minutes for a large model)")
    plan = builder.build_serialized_network(network, bconfig)
    if plan is None:
        raise EngineBuildError("TensorRT could not build the engine (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes(plan)
    engine_path.write_bytes(data)

    meta_path = engine_path.with_name(engine_path.name + ".json")
    meta = {
        "onnx": str(onnx_path),
        "tensorrt_version": trt.__version__,
        "plugin_mode": config.plugin_mode,
        "profiles": {PROFILE_NAMES[p]: {n: [list(s) for s in v] for n, v in shp.items()} for p, shp in enumerate(profiles)},
        "inputs": [vi.name for vi in model.graph.input],
        "outputs": [vo.name for vo in model.graph.output],
        "ucm": {p.key: p.value for p in model.metadata_props if p.key.startswith("ucm.")},
        "build_config": {k: v for k, v in asdict(config).items() if k != "fixed_dims"} | {"fixed_dims": dict(config.fixed_dims)},
        "sms": sms,  # the SM count the split-K attention was planned for (None: no split nodes)
        "split_attention_nodes": split,
    }  # fmt: skip
    meta_path.write_text(json.dumps(meta, indent=1))
    seconds = time.perf_counter() - t_start
    progress(f"saved {engine_path} ({len(data) / 1e6:.1f} MB, {plugin_layers} plugin layers) in {seconds:.1f} s")
    return BuildResult(engine_path, meta_path, plugin_layers, seconds, len(data))
