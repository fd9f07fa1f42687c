"""Rewrite driver: find every attention node, apply the rules, rewire to the paged KV contract.

    model, report = rewrite_model("in.onnx", config=RewriteConfig(algorithm="esa", block_size=16))

Order of work (nothing is modified until every candidate has been matched and checked):

1. load + check the model (malformed input -> ``ValueError`` naming the problem), infer shapes;
2. collect anchors (Softmax, ``Attention``, ``com.microsoft`` attention ops) and run the rules'
   pattern/check step on each: ``rewritten`` / ``unsupported`` (attention-like, with a reason) /
   ``not_attention`` (ignored, with a reason);
3. any ``unsupported`` node, or no attention at all -> ``RewriteError`` carrying the report,
   unless ``allow_partial`` (then those layers keep their contiguous KV I/O and are listed);
4. rewrite each match into one UCM node, add the paged inputs/outputs (docs/graph.md §I/O),
   drop present/past KV and attention_mask, remove dead nodes, verify that no remaining node
   reads a removed input, attach the function bodies, run the ONNX checker.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from ucm_trt import algorithms as registry
from ucm_trt.config import ReRoPEConfig
from ucm_trt.graph.functions import MIN_OPSET, build_function
from ucm_trt.graph.rules import UNSUPPORTED_ANCHORS, AttentionMatch, Rule, default_rules
from ucm_trt.graph.schemas import (
    DOMAIN,
    PAGED_REROPE_ATTENTION,
    PAGED_SPARSE_ATTENTION,
    SELECT_ALL_BLOCKS,
    SPLIT_COUNTERS_INPUT,
    SPLIT_OPS,
    node_attributes,
)
from ucm_trt.limits import block_size_problem, head_dim_problem

__all__ = [
    "ALGORITHMS",
    "RewriteConfig",
    "RewriteError",
    "NodeReport",
    "RewriteReport",
    "rewrite_model",
    "save_model",
    "load_model",
]

#: every algorithm (the registry's, ``ucm_trt.algorithms``); its ``graph_op`` says what the rewrite emits
ALGORITHMS: tuple[str, ...] = registry.names()

Status = Literal["rewritten", "unsupported", "not_attention"]


@dataclass(frozen=True, kw_only=True)
class RewriteConfig:
    """How to rewrite.

    algorithm:        one of ALGORITHMS; its registry entry's ``graph_op`` decides the graph. All
                      block-selecting algorithms produce the same graph (the UcmPagedSparseAttention
                      op with per-layer selection inputs); they differ in the runtime policy, recorded
                      in the model metadata. ``dense`` selects every block in-graph; ``rerope`` uses
                      UcmPagedReRoPEAttention (pool of un-rotated K).
    block_size:       tokens per KV block (pool axis 3); the kernels' rule (``ucm_trt.limits``): a power
                      of two in [16, 256]. Attention whose head_dim breaks the kernels' rule (a multiple
                      of 16 in [16, 256]) is reported ``unsupported`` with that reason.
    rerope:           ReRoPE window / training length / log-n; required iff algorithm == "rerope".
    selection_inputs: per-layer ``selection.{i}`` inputs; None = yes for sparse algorithms, no for
                      dense and rerope (set True to combine ReRoPE with block sparsity).
    dense_layers:     layers that always attend to every block ("rollback" layers): no selection input.
    allow_partial:    write a model even if some attention nodes could not be rewritten; those
                      layers keep contiguous past/present I/O and are listed in the report.
    split_scratch:    emit the split-K variants of the attention ops (``UcmPagedSparseAttentionSplitK`` /
                      ``UcmPagedReRoPEAttentionSplitK``: TensorRT engines run the split-K kernel) with the
                      graph input ``attn_split_counters`` (int32 ``[split_counters]``, zeros; one buffer for
                      every layer) and each node's unconsumed ``split_partials.{i}`` output. False: the v1
                      ops (7 inputs, one output; engines run the unsplit kernel), as models rewritten
                      before issue 14. ONNX Runtime computes the same outputs either way.
    query_window:     prompt queries per layer the model returns for the policy's first retrieval
                      (``Policy.query_window``: ESA / GSA's ``PrefillWindow``, KVStar's voting group):
                      ``> 1`` adds the outputs ``query_window.{i}`` ``[batch, Hq, min(W, chunk), D]``, the
                      queries of the chunk's last tokens (one at a decode step); recorded as
                      ``ucm.query_window``. 1: only ``last_query.{i}`` (the models rewritten before it).
    """

    algorithm: str = "esa"
    block_size: int = 128
    rerope: ReRoPEConfig | None = None
    selection_inputs: bool | None = None
    dense_layers: tuple[int, ...] = ()
    allow_partial: bool = False
    split_scratch: bool = True
    query_window: int = 64

    def __post_init__(self) -> None:
        c = "RewriteConfig"
        if isinstance(self.query_window, bool) or not isinstance(self.query_window, int) or self.query_window < 1:
            raise ValueError(f"{c}.query_window must be an int >= 1, got {self.query_window!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"{c}.algorithm must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}")
        op = registry.get(self.algorithm).graph_op
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"{c}.block_size must be an int, got {self.block_size!r}")
        problem = block_size_problem(self.block_size)
        if problem is not None:  # the kernels (TensorRT plugins, Triton) run nothing else
            raise ValueError(f"{c}.block_size {problem} (the kernels' rule), got {self.block_size}")
        if op == "rerope" and not isinstance(self.rerope, ReRoPEConfig):
            raise ValueError(f"{c}.rerope must be a ReRoPEConfig when algorithm={self.algorithm!r}, got {self.rerope!r}")
        if op != "rerope" and self.rerope is not None:
            raise registry.refuse(self.algorithm, f"{c}.rerope", "a rewrite emits ReRoPE attention for "
                                  "algorithm='rerope' only (combine it with block sparsity by selection_inputs=True)")
        if self.selection_inputs is not None and not isinstance(self.selection_inputs, bool):
            raise TypeError(f"{c}.selection_inputs must be a bool or None, got {self.selection_inputs!r}")
        if op == "dense" and self.selection_inputs:
            raise registry.refuse(self.algorithm, f"{c}.selection_inputs=True",
                                  "it attends to every block; its model has no selection inputs")
        if not isinstance(self.dense_layers, tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.dense_layers
        ):
            raise ValueError(f"{c}.dense_layers must be a tuple of layer indices >= 0, got {self.dense_layers!r}")
        if not isinstance(self.allow_partial, bool):
            raise TypeError(f"{c}.allow_partial must be a bool, got {self.allow_partial!r}")
        if not isinstance(self.split_scratch, bool):
            raise TypeError(f"{c}.split_scratch must be a bool, got {self.split_scratch!r}")

    @property
    def graph_op(self) -> str:
        """The attention the rewrite emits (the registry's ``graph_op``: dense, sparse or rerope)."""
        return registry.get(self.algorithm).graph_op

    @property
    def with_selection(self) -> bool:
        if self.selection_inputs is not None:
            return self.selection_inputs
        return registry.get(self.algorithm).selects_blocks


@dataclass
class NodeReport:
    node: str
    op_type: str
    status: Status
    reason: str
    rule: str | None = None
    layer: int | None = None


@dataclass
class RewriteReport:
    algorithm: str
    nodes: list[NodeReport] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    partial: bool = False

    @property
    def rewritten(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status == "rewritten"]

    @property
    def unsupported(self) -> list[NodeReport]:
        return [n for n in self.nodes if n.status == "unsupported"]

    def summary(self) -> str:
        lines = [
            f"algorithm={self.algorithm}: {len(self.rewritten)} attention node(s) rewritten, "
            f"{len(self.unsupported)} unsupported, "
            f"{sum(n.status == 'not_attention' for n in self.nodes)} look-alike(s) ignored"
            + (" [PARTIAL]" if self.partial else "")
        ]
        lines.append("counts per rule: " + (", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"))
        for n in self.nodes:
            where = f" layer {n.layer}" if n.layer is not None else ""
            rule = f" [{n.rule}]" if n.rule else ""
            lines.append(f"  {n.status:13s} {n.op_type} {n.node!r}{where}{rule}: {n.reason}")
        if self.inputs:
            lines.append("inputs:  " + ", ".join(self.inputs))
            lines.append("outputs: " + ", ".join(self.outputs))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


class RewriteError(ValueError):
    """The model cannot be rewritten as asked; ``report`` lists every attention node and why."""

    def __init__(self, message: str, report: RewriteReport | None = None) -> None:
        super().__init__(message if report is None else f"{message}\n{report.summary()}")
        self.report = report


# ---------------------------------------------------------------------------------------------
# loading / saving


def load_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """Load and check an ONNX model; malformed input raises ValueError naming the problem."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"model path {str(path)!r} does not exist or is not a file")
        try:
            proto = onnx.load(str(path))
        except Exception as e:  # protobuf DecodeError and friends
            raise ValueError(f"model {str(path)!r} is not a valid ONNX file: {type(e).__name__}: {e}") from None
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        raise TypeError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    if not proto.graph.node:
        raise ValueError("model has an empty graph (no nodes): nothing to rewrite")
    why = _check(proto)
    if why:
        raise ValueError(f"model fails the ONNX checker: {why}")
    return proto


def _check(proto: onnx.ModelProto) -> str | None:
    """onnx.checker on the skeleton; returns the first line of the error, or None.

    Ops that ONNX Runtime registers in the default domain (e.g. ``SimplifiedLayerNormalization``,
    emitted by ORT-targeted exporters) are unknown to onnx's checker; such a model is accepted.
    """
    try:
        onnx.checker.check_model(_skeleton(proto))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if first.startswith("No Op registered for"):
            return None
        return first
    return None


def _skeleton(proto: onnx.ModelProto, *, min_bytes: int = 65536) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs.

    The ONNX checker and shape inference serialise the whole model; on a 650 MB model that takes
    ~30 s and fails above 2 GB. Neither needs the weights' values (only their types and shapes;
    data propagation only reads small shape constants), so both run on this skeleton.
    """
    sk = onnx.ModelProto()
    sk.ir_version = proto.ir_version
    sk.opset_import.extend(proto.opset_import)
    sk.functions.extend(proto.functions)
    g = sk.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    g.value_info.extend(proto.graph.value_info)
    for init in proto.graph.initializer:
        if init.ByteSize() > min_bytes:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)
    return sk


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save; weights go to ``<name>.data`` beside it when the model is too large for one protobuf.

    The folder must exist (it is never created here: a typo in a path must not scatter folders).
    """
    out = Path(path)
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise ValueError(f"path {str(out)!r}: its folder {str(out.parent)!r} {what}")
    if out.is_dir():
        raise ValueError(f"path {str(out)!r} is a directory; give a file path")
    large = model.ByteSize() > 1_800_000_000
    onnx.save(model, str(out), save_as_external_data=large, location=out.name + ".data" if large else None)
    return out


# ---------------------------------------------------------------------------------------------
# the rewrite


def _layer_of(m: AttentionMatch, fallback: int) -> int:
    found = re.findall(r"\d+", m.past_key.name or "")
    return int(found[0]) if found else fallback


def _const(tape: ir.tape.Tape, values, dtype=np.int64) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(values, dtype=dtype))})


class _Emitter:
    """Creates one layer's UCM node; remembers what the runtime outputs need."""

    def __init__(self, tape, cfg: RewriteConfig, m: AttentionMatch, pool, block_table, seq_lens, selection,
                 counters=None, layer: int = 0):
        self.tape, self.cfg, self.m = tape, cfg, m
        self.pool, self.block_table, self.seq_lens, self.selection = pool, block_table, seq_lens, selection
        self.counters, self.layer = counters, layer  # counters: the split-K scratch input (None: v1 ops)
        self.k_out = self.v_out = self.q_out = None

    def positions(self, q4: ir.Value) -> ir.Value:
        """True positions [B, T] of the chunk: seq_lens - T + arange(T)."""
        t = self.tape
        T = t.op("Shape", [q4], attributes={"start": 2, "end": 3})
        past = t.op("Sub", [t.op("Cast", [self.seq_lens], attributes={"to": ir.DataType.INT64}),
                            t.op("Squeeze", [T, _const(t, [0])])])  # fmt: skip
        ar = t.op("Range", [_const(t, 0), t.op("Squeeze", [T, _const(t, [0])]), _const(t, 1)])
        return t.op("Add", [t.op("Unsqueeze", [past, _const(t, [1])]), t.op("Unsqueeze", [ar, _const(t, [0])])])

    def __call__(self, q, k, v, q_unrot, k_unrot) -> ir.Value:
        m, cfg = self.m, self.cfg
        common = dict(num_q_heads=m.num_q_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                      block_size=cfg.block_size, scale=float(m.scale))  # fmt: skip
        if cfg.graph_op == "rerope":
            schema = PAGED_REROPE_ATTENTION
            attrs = node_attributes(
                schema, **common, rope_theta=float(m.rope_theta), rerope_window=cfg.rerope.window,
                logn_training_length=cfg.rerope.logn_training_length or 0,
            )  # fmt: skip
            q, k = q_unrot, k_unrot
        else:
            schema = PAGED_SPARSE_ATTENTION
            attrs = node_attributes(schema, **common)
        self.q_out, self.k_out, self.v_out = q, k, v
        inputs = [q, k, v, self.pool, self.block_table, self.seq_lens, self.selection]
        name = f"ucm_attention_{m.anchor.name or id(m.anchor)}"
        if self.counters is None:
            return self.tape.op(schema.name, inputs, attributes=attrs, domain=DOMAIN, name=name)
        # the split-K variant: num_sms stays 0 here (the engine builder stamps its target's SM count)
        split = SPLIT_OPS[schema.name]
        partials = ir.Value(name=f"split_partials.{self.layer}", type=ir.TensorType(ir.DataType.FLOAT),
                            shape=ir.Shape(["split_partials"]))  # consumed by nothing; not a graph output
        out = ir.Value(name=None)
        self.tape.op_multi_out(split.name, [*inputs, self.counters], attributes=node_attributes(split, **attrs),
                               outputs=[out, partials], domain=DOMAIN, name=name)  # fmt: skip
        return out


def _reroute_past(past: ir.Value, stand_in: ir.Value) -> str | None:
    """Point remaining readers of a removed past input at ``stand_in`` (empty [B, Hkv, 0, D]).

    Only shape reads of axes 0, 1, 3 are allowed (batch, heads, head_dim agree; axis 2 would
    be the past length, which the paged model does not have). Returns a reason on failure.
    """
    for user, idx in list(past.uses()):
        if user.op_type != "Shape":
            return f"past input {past.name!r} is still read by {user.op_type} node {user.name!r} after rewriting"
        start = user.attributes.get("start")
        end = user.attributes.get("end")
        start = 0 if start is None else start.value % 4 if start.value < 0 else start.value
        end = 4 if end is None else end.value % 4 if end.value < 0 else min(end.value, 4)
        if 2 in range(start, end):
            if (start, end) != (0, 4):
                return f"node {user.name!r} reads the past length of {past.name!r}"
            for u2, _ in user.outputs[0].uses():
                ok = False
                if u2.op_type == "Gather" and (u2.attributes.get("axis") is None or u2.attributes["axis"].value == 0):
                    from ucm_trt.graph.rules.base import const_array

                    ix = const_array(u2.inputs[1])
                    ok = ix is not None and not np.isin(np.asarray(ix) % 4, [2]).any()
                if not ok:
                    return f"node {u2.name!r} ({u2.op_type}) may read the past length of {past.name!r}"
        user.replace_input_with(idx, stand_in)
    return None


def _fold_static_shape_reads(graph: ir.Graph, roots: list[ir.Value], tape: ir.tape.Tape) -> None:
    """Replace reads of STATIC dims (heads, head_dim) of tensors derived from the removed past
    inputs by constants, so the dead KV-cache chain can be removed. Exporters compute e.g. the
    attention output's reshape target from ``Shape(repeat_kv(V))[3]``. Dynamic dims are left
    alone (a live read of the past length is an error reported by the caller)."""
    from ucm_trt.graph.rules.base import const_array

    tainted: set[int] = set()
    frontier = list(roots)
    shapes: list[ir.Node] = []
    while frontier:
        v = frontier.pop()
        for user, _ in v.uses():
            if id(user) in tainted:
                continue
            tainted.add(id(user))
            if user.op_type == "Shape" and user.domain == "":
                shapes.append(user)
                continue
            frontier.extend(user.outputs)
    for sh in shapes:
        x = sh.inputs[0]
        if x.shape is None:
            continue
        dims = list(x.shape)
        rank = len(dims)
        start = sh.attributes["start"].value if "start" in sh.attributes else 0
        end = sh.attributes["end"].value if "end" in sh.attributes else rank
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else min(end, rank))
        sel = dims[start:end]
        if all(isinstance(d, int) for d in sel):
            sh.outputs[0].replace_all_uses_with(_const(tape, sel))
            continue
        for user, _ in list(sh.outputs[0].uses()):
            if user.op_type != "Gather" or ("axis" in user.attributes and user.attributes["axis"].value != 0):
                continue
            ix = const_array(user.inputs[1])
            if ix is None:
                continue
            picked = [sel[int(i)] for i in np.ravel(ix)]
            if all(isinstance(d, int) for d in picked):
                user.outputs[0].replace_all_uses_with(_const(tape, np.asarray(picked).reshape(np.shape(ix))))


def _drop_empty_row_guards(outputs: list[ir.Value]) -> int:
    """Remove ``Where(no_visible_key(row), 0, attention)`` guards that follow a rewritten attention.

    Exporters (transformers' ORT exporter) zero query rows whose mask has no visible key:
    ``Where([Transpose](Less(ReduceSum(mask), c <= 1)), zeros, [Reshape|Transpose](attn))``.
    Under the UCM ops every query sees at least itself, so the guard is the identity; keeping it
    would keep the contiguous mask (and its past length) alive. Returns how many were removed.
    """
    from ucm_trt.graph.rules.base import const_array, producer

    removed = 0
    for out in outputs:
        v = out
        for _ in range(4):
            uses = list(v.uses())
            if len(uses) != 1:
                break
            user, idx = uses[0]
            if user.op_type in ("Reshape", "Transpose") and idx == 0:
                v = user.outputs[0]
                continue
            if user.op_type == "Where" and idx == 2:
                zeros = const_array(user.inputs[1])
                cond = user.inputs[0]
                while producer(cond, "Transpose") is not None:
                    cond = producer(cond, "Transpose").inputs[0]
                less = producer(cond, "Less")
                red = producer(less.inputs[0], "ReduceSum") if less is not None else None
                c = const_array(less.inputs[1]) if less is not None else None
                if zeros is not None and not np.any(zeros) and red is not None and c is not None and c.size == 1 \
                        and float(c) <= 1:  # fmt: skip
                    user.outputs[0].replace_all_uses_with(v, replace_graph_outputs=True)
                    removed += 1
            break
    return removed


def _check_masks(proto: onnx.ModelProto, matches: list[tuple[AttentionMatch, NodeReport]], report) -> None:
    """Run the subgraph computing each distinct attention mask once and mark the nodes whose mask
    is not plain causal as unsupported (``graph.mask_probe``): the UCM op would drop it."""
    from ucm_trt.graph.mask_probe import probe_causal_mask

    past_shapes = {}
    for m, _ in matches:
        for v in (m.past_key, m.past_value):
            if v is not None and v.is_graph_input():
                past_shapes[v.name] = (m.num_kv_heads, m.head_dim)
    verdicts: dict[tuple[str, bool], str | None] = {}
    for m, nr in matches:
        mask = m.extra.get("mask")
        if mask is None:
            continue
        key = (mask.name, bool(m.extra.get("mask_causal_applied", False)))
        if key not in verdicts:
            elem = int(mask.dtype) if mask.dtype is not None else onnx.TensorProto.FLOAT
            verdicts[key] = probe_causal_mask(proto, mask.name, past_shapes, mask_elem_type=elem,
                                              causal_applied=key[1])
        why = verdicts[key]
        if why is not None:
            nr.status, nr.reason = "unsupported", f"mask {mask.name!r}: {why}"


def rewrite_model(
    model: str | Path | onnx.ModelProto,
    *,
    config: RewriteConfig,
    rules: tuple[Rule, ...] | None = None,
) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite ``model``'s attention to UCM paged ops; returns (new model, report).

    Raises ``RewriteError`` (a ValueError) with the full report when an attention node cannot be
    rewritten (unless ``config.allow_partial``) or none is found; ``ValueError``/``TypeError``
    for malformed models and bad arguments. The input model is never modified.

    Steps (module docstring): load and infer shapes; match every anchor against the rules; check
    the masks and number the layers (refusing what cannot be rewritten); emit one UCM node per
    layer with the paged inputs / outputs; drop the contiguous KV I/O; attach the functions and
    check the result.
    """
    if not isinstance(config, RewriteConfig):
        raise TypeError(f"config must be a RewriteConfig, got {type(config).__name__}")
    proto = load_model(model)
    opset = _check_rewritable(proto)
    irm = _ir_with_shapes(proto)
    rules = default_rules() if rules is None else rules
    report = RewriteReport(algorithm=config.algorithm)
    matches = _match_attention(irm.graph, rules, config, report)
    _check_masks(proto, matches, report)
    matches = [(m, nr) for m, nr in matches if nr.status == "rewritten"]
    _number_layers(matches, config)
    _refuse_unrewritable(matches, config, report)
    tape, removed_inputs, block_table, layers_meta = _emit_paged_layers(irm, matches, rules, config, report)
    _drop_contiguous_kv(irm, tape, removed_inputs, block_table, report)
    return _finish(irm, proto, opset, config, report, layers_meta)


def _check_rewritable(proto: onnx.ModelProto) -> int:
    """The default-domain opset; refuses an old opset or a model rewritten before."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < MIN_OPSET:
        raise ValueError(f"model default-domain opset must be >= {MIN_OPSET}, got {opset}")
    if any(f.domain == DOMAIN for f in proto.functions) or any(n.domain == DOMAIN for n in proto.graph.node):
        raise ValueError(f"model already contains '{DOMAIN}' ops: it has been rewritten before")
    return opset


def _ir_with_shapes(proto: onnx.ModelProto) -> ir.Model:
    """The model in onnx_ir, with inferred shapes (data propagation) where the graph lacks them."""
    irm = ir.serde.deserialize_model(proto)
    try:  # shapes (with data propagation) help the rules find static head counts
        inferred = onnx.shape_inference.infer_shapes(_skeleton(proto), strict_mode=False, data_prop=True)
    except Exception:  # an aid only: the rules fail with a reason when shapes are missing
        inferred = None
    if inferred is not None:
        infos = {vi.name: vi for vi in inferred.graph.value_info}
        for node in irm.graph:
            for v in node.outputs:
                if v.name in infos and (v.shape is None or v.type is None):
                    ir.serde.deserialize_value_info_proto(infos[v.name], v)
    return irm


def _match_attention(graph, rules: tuple[Rule, ...], config: RewriteConfig,
                     report: RewriteReport) -> list[tuple[AttentionMatch, NodeReport]]:
    """Every anchor node against the rules: one NodeReport each (rewritten / unsupported /
    not_attention, with the reason); returns the matches still marked rewritten."""
    by_anchor: dict[tuple[str, str], list[Rule]] = {}
    for r in rules:
        for a in r.anchors:
            by_anchor.setdefault(a, []).append(r)
    matches: list[tuple[AttentionMatch, NodeReport]] = []
    for node in list(graph):
        key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        label = node.name or f"<{node.op_type}>"
        if key in UNSUPPORTED_ANCHORS:
            report.nodes.append(NodeReport(label, node.op_type, "unsupported", UNSUPPORTED_ANCHORS[key]))
            continue
        if key not in by_anchor:
            continue
        failures = []
        for r in by_anchor[key]:
            res = r.match(node)
            if isinstance(res, AttentionMatch):
                break
            failures.append(res)
        else:
            attention_like = any(f.attention_like for f in failures)
            status: Status = "unsupported" if attention_like else "not_attention"
            reason = "; ".join(f.reason for f in failures)
            report.nodes.append(NodeReport(label, node.op_type, status, reason,
                                           rule=by_anchor[key][0].name if len(failures) == 1 else None))  # fmt: skip
            continue
        nr = NodeReport(label, node.op_type, "rewritten", "matched", rule=res.rule)
        head_dim_why = head_dim_problem(res.head_dim)
        if head_dim_why is not None:
            nr.status, nr.reason = "unsupported", (
                f"head_dim {res.head_dim} cannot run on the UCM kernels: head_dim {head_dim_why}"
            )
        elif config.graph_op == "rerope" and res.rope_failure is not None:
            nr.status, nr.reason = "unsupported", f"ReRoPE needs the un-rotated q/k and RoPE theta: {res.rope_failure}"
        report.nodes.append(nr)
        if nr.status == "rewritten":
            matches.append((res, nr))
    return matches


def _number_layers(matches: list[tuple[AttentionMatch, NodeReport]], config: RewriteConfig) -> None:
    """Layer numbers from the past input names (else graph order), and each node's report line."""
    seen_layers: dict[int, str] = {}
    for i, (m, nr) in enumerate(matches):
        layer = _layer_of(m, i)
        if layer in seen_layers:
            layer = max(seen_layers) + 1
        seen_layers[layer] = nr.node
        nr.layer = layer
        op = PAGED_REROPE_ATTENTION.name if config.graph_op == "rerope" else PAGED_SPARSE_ATTENTION.name
        nr.reason = (
            f"-> {SPLIT_OPS[op].name if config.split_scratch else op} "
            f"(Hq={m.num_q_heads}, Hkv={m.num_kv_heads}, D={m.head_dim}, scale={m.scale:.6g}"
            + (f", theta={m.rope_theta:g}" if config.graph_op == "rerope" else "")
            + ")"
            + "".join(f"; {note}" for note in m.extra.get("notes", ()))
        )


def _refuse_unrewritable(matches, config: RewriteConfig, report: RewriteReport) -> None:
    """RewriteError (with the report) for shared past inputs, unsupported nodes (unless
    allow_partial) or no attention at all; else the report's counts and partial flag."""
    pasts = Counter(id(m.past_key) for m, _ in matches)
    if any(c > 1 for c in pasts.values()):
        raise RewriteError("two attention nodes read the same past KV input; cannot assign one pool per layer", report)
    if report.unsupported and not config.allow_partial:
        raise RewriteError(
            f"{len(report.unsupported)} attention node(s) cannot be rewritten; nothing written "
            "(pass allow_partial / --allow-partial to keep them on contiguous KV)",
            report,
        )
    if not matches:
        raise RewriteError("no rewritable attention node found; nothing written", report)
    report.partial = bool(report.unsupported)
    for m, _ in matches:
        report.counts[m.rule] = report.counts.get(m.rule, 0) + 1


def _emit_paged_layers(irm, matches, rules: tuple[Rule, ...], config: RewriteConfig, report: RewriteReport):
    """One UCM node per matched layer: the paged inputs (seq_lens, block_table, kv_pool.{i},
    selection.{i}) and outputs (new_key / new_value / last_query, query_window when
    ``config.query_window > 1``), the present outputs dropped.
    Returns the tape, the past inputs to remove with their matches, the block table input and
    each layer's metadata (``ucm.layers``)."""
    graph = irm.graph
    existing = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    for n in graph:
        existing.update(o.name for o in n.outputs)

    def new_input(name, dtype, shape):
        if name in existing:
            raise RewriteError(f"model already has a value named {name!r}; cannot add the paged input")
        v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        graph.inputs.append(v)
        return v

    batch = "batch"
    first_past = matches[0][0].past_key
    if first_past.shape is not None and not isinstance(first_past.shape[0], int):
        batch = str(first_past.shape[0])
    seq_lens = new_input("seq_lens", ir.DataType.INT32, [batch])
    block_table = new_input("block_table", ir.DataType.INT32, [batch, "max_blocks"])
    # one zeroed counter buffer for every layer: each split-K launch leaves it zero, and the layers run
    # in order on one stream (the engine builder fixes its length per build, docs/graph.md)
    counters = new_input(SPLIT_COUNTERS_INPUT, ir.DataType.INT32, ["split_counters"]) if config.split_scratch else None
    tape = ir.tape.Tape(graph)
    select_all: dict[int, ir.Value] = {}
    removed_inputs: list[tuple[ir.Value, AttentionMatch]] = []
    new_outputs: list[ir.Value] = []
    layers_meta = {}
    ucm_outputs: list[ir.Value] = []
    for m, nr in sorted(matches, key=lambda x: x[1].layer):
        i = nr.layer
        pool = new_input(f"kv_pool.{i}", m.past_key.dtype or ir.DataType.FLOAT,
                         ["num_blocks", 2, m.num_kv_heads, config.block_size, m.head_dim])  # fmt: skip
        if config.with_selection and i not in config.dense_layers:
            sel = new_input(f"selection.{i}", ir.DataType.INT32, [batch, m.num_kv_heads, "max_selected"])
        else:
            if m.num_kv_heads not in select_all:
                select_all[m.num_kv_heads] = tape.op(
                    SELECT_ALL_BLOCKS.name, [block_table], domain=DOMAIN,
                    attributes=node_attributes(SELECT_ALL_BLOCKS, num_kv_heads=m.num_kv_heads),
                    name=f"ucm_select_all_hkv{m.num_kv_heads}",
                )  # fmt: skip
            sel = select_all[m.num_kv_heads]
        rule = next(r for r in rules if r.name == m.rule)
        emitter = _Emitter(tape, config, m, pool, block_table, seq_lens, sel, counters=counters, layer=i)
        out = rule.rewrite(tape, m, emitter)
        if m.output.is_graph_output():
            raise RewriteError(f"attention output {m.output.name!r} is a graph output; unsupported", report)
        m.output.replace_all_uses_with(out)
        ucm_outputs.append(out)
        for name, val in ((f"new_key.{i}", emitter.k_out), (f"new_value.{i}", emitter.v_out)):
            o = ir.Value(name=name, type=ir.TensorType(val.dtype or pool.dtype),
                         shape=ir.Shape([batch, m.num_kv_heads, "seq", m.head_dim]))  # fmt: skip
            tape.op("Identity", [val], output=o)
            new_outputs.append(o)
        lq = ir.Value(name=f"last_query.{i}", type=ir.TensorType(emitter.q_out.dtype or pool.dtype),
                      shape=ir.Shape([batch, m.num_q_heads, m.head_dim]))  # fmt: skip
        tape.op("Gather", [emitter.q_out, _const(tape, -1)], attributes={"axis": 2}, output=lq)
        new_outputs.append(lq)
        if config.query_window > 1:
            # the last min(W, T) queries of the chunk: Slice clamps the start -W to 0 on a shorter chunk
            qw = ir.Value(name=f"query_window.{i}", type=ir.TensorType(emitter.q_out.dtype or pool.dtype),
                          shape=ir.Shape([batch, m.num_q_heads, "window", m.head_dim]))  # fmt: skip
            tape.op("Slice", [emitter.q_out, _const(tape, [-config.query_window]),
                              _const(tape, [np.iinfo(np.int64).max]), _const(tape, [2])], output=qw)
            new_outputs.append(qw)
        removed_inputs += [(m.past_key, m), (m.past_value, m)]
        for pres in (m.present_key, m.present_value):
            idx = [j for j, o in enumerate(graph.outputs) if o is pres]
            for j in reversed(idx):
                graph.outputs.pop(j)
        layers_meta[i] = dict(num_q_heads=m.num_q_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                              scale=m.scale, rule=m.rule, rope_theta=m.rope_theta,
                              selection=isinstance(sel, ir.Value) and sel.is_graph_input())  # fmt: skip
    graph.outputs.extend(new_outputs)
    guards = _drop_empty_row_guards(ucm_outputs)
    if guards:
        report.counts["drop_empty_row_guard"] = guards
    return tape, removed_inputs, block_table, layers_meta


def _drop_contiguous_kv(irm, tape, removed_inputs, block_table, report: RewriteReport) -> None:
    """Remove the past KV inputs (their shape-only readers get an empty stand-in) and the
    attention mask (kept only for layers a partial rewrite left on contiguous KV)."""
    graph = irm.graph
    graph.sort()
    ir_passes.RemoveUnusedNodesPass()(irm)
    _fold_static_shape_reads(graph, [p for p, _ in removed_inputs], tape)
    ir_passes.RemoveUnusedNodesPass()(irm)
    for past, m in removed_inputs:
        # an empty [B, Hkv, 0, D] tensor that depends only on block_table (no cycle through attention)
        dims = tape.op("Concat", [tape.op("Shape", [block_table], attributes={"start": 0, "end": 1}),
                                  _const(tape, [m.num_kv_heads, 0, m.head_dim])], attributes={"axis": 0})  # fmt: skip
        zero = ir.tensor(np.zeros([1], dtype=ir.DataType(past.dtype).numpy() if past.dtype else np.float32))
        stand_in = tape.op("ConstantOfShape", [dims], attributes={"value": zero})
        why = _reroute_past(past, stand_in)
        if why:
            raise RewriteError(f"rewrite left a dangling read of the contiguous KV cache: {why}", report)
        graph.inputs.remove(past)
    graph.sort()
    for v in list(graph.inputs):
        if v.name == "attention_mask":
            if v.uses() and report.partial:  # the layers left on contiguous KV still need it
                continue
            if v.uses():
                users = ", ".join(f"{u.op_type} {u.name!r}" for u, _ in v.uses())
                raise RewriteError(f"attention_mask is still read after rewriting (by {users}); "
                                   "the paged model replaces it with seq_lens", report)  # fmt: skip
            graph.inputs.remove(v)
    ir_passes.RemoveUnusedNodesPass()(irm)


def _finish(irm, proto: onnx.ModelProto, opset: int, config: RewriteConfig, report: RewriteReport,
            layers_meta: dict) -> tuple[onnx.ModelProto, RewriteReport]:
    """Metadata, the UCM function bodies and opset, the ONNX checker; the report's I/O lists."""
    irm.metadata_props.update({
        "ucm.algorithm": config.algorithm,
        "ucm.block_size": str(config.block_size),
        "ucm.layers": json.dumps({str(k): v for k, v in sorted(layers_meta.items())}),
        "ucm.partial": str(report.partial).lower(),
        "ucm.query_window": str(config.query_window),
    })  # fmt: skip
    if config.rerope is not None:
        irm.metadata_props["ucm.rerope"] = json.dumps(asdict(config.rerope))
    out = ir.serde.serialize_model(irm)
    used = {n.op_type for n in out.graph.node if n.domain == DOMAIN}
    del out.functions[:]  # the input had no ucm functions; others (none from exporters) are re-added below
    for f in proto.functions:
        out.functions.append(f)
    for name in sorted(used):
        out.functions.append(build_function(name, opset=opset))
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    if out.ir_version < 8:
        out.ir_version = 8
    why = _check(out)
    if why:  # a bug in a rule, not in the user's model
        raise RewriteError(f"internal error: the rewritten model fails the ONNX checker: {why}", report)
    report.inputs = [i.name for i in out.graph.input]
    report.outputs = [o.name for o in out.graph.output]
    return out, report
