"""UCM ONNX op schemas: written once, read by the rewriter, the function bodies and the plugins.

Every UCM op lives in ONNX domain ``ucm`` and carries two string attributes that TensorRT's
ONNX parser uses to find the plugin creator (shared/reference/tensorrt.md §4.1/§4.2):
``plugin_namespace="ucm"`` and ``plugin_version``. Op names never collide with ONNX or
TensorRT built-ins (no ``Attention``, no ``RotaryEmbedding``).

A schema is plain data: inputs and outputs (name, element types, symbolic shape, meaning),
attributes (name, type, default, rule) and a semantics paragraph. ``functions.py`` turns a
schema plus a body builder into an ONNX model-local function so ONNX Runtime can run the op
with no custom-op library; the TensorRT plugins (``trt_plugins/``) read the same schema
for their field names. Once a version is released its semantics never change: add a new
version next to it and record it in ``VERSIONS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "DOMAIN",
    "PLUGIN_NAMESPACE",
    "AttrSpec",
    "TensorSpec",
    "OpSchema",
    "SCHEMAS",
    "get_schema",
    "node_attributes",
    "PAGED_SPARSE_ATTENTION",
    "PAGED_REROPE_ATTENTION",
    "SELECT_ALL_BLOCKS",
    "PAGED_SPARSE_ATTENTION_SPLIT",
    "PAGED_REROPE_ATTENTION_SPLIT",
    "SPLIT_OPS",
    "SPLIT_COUNTERS_INPUT",
]

DOMAIN = "ucm"
PLUGIN_NAMESPACE = "ucm"

FLOAT_TYPES = ("float", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One input or output of an op. ``shape`` uses symbolic names shared across the schema."""

    name: str
    types: tuple[str, ...]
    shape: tuple[str, ...]
    doc: str


@dataclass(frozen=True, kw_only=True)
class AttrSpec:
    """One attribute. ``kind`` is ``int``, ``float`` or ``string``; ``default`` None = required."""

    name: str
    kind: str
    doc: str
    default: int | float | str | None = None
    minimum: float | None = None

    def check(self, op: str, value: object) -> int | float | str:
        """Validate ``value``; the error names the op, the attribute, the value and the rule."""
        want = {"int": int, "float": (int, float), "string": str}[self.kind]
        if isinstance(value, bool) or not isinstance(value, want):
            raise TypeError(f"{op}.{self.name} must be of type {self.kind}, got {value!r} ({type(value).__name__})")
        if self.minimum is not None and value < self.minimum:  # type: ignore[operator]
            raise ValueError(f"{op}.{self.name} must be >= {self.minimum}, got {value}")
        return float(value) if self.kind == "float" else value  # type: ignore[return-value]


# The two attributes TensorRT's parser reads to find the plugin; they are on every UCM node.
_PLUGIN_ATTRS = (
    AttrSpec(
        name="plugin_namespace",
        kind="string",
        default=PLUGIN_NAMESPACE,
        doc="TensorRT plugin namespace; always 'ucm'. Makes TensorRT >= 10.15 prefer the plugin "
        "over the model-local function.",
    ),
    AttrSpec(name="plugin_version", kind="string", default="1", doc="Plugin version (string, as TensorRT wants)."),
)


@dataclass(frozen=True, kw_only=True)
class OpSchema:
    name: str
    version: str
    summary: str
    semantics: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttrSpec, ...] = field(default=())

    @property
    def all_attributes(self) -> tuple[AttrSpec, ...]:
        return _PLUGIN_ATTRS + self.attributes

    @property
    def qualified_name(self) -> str:
        return f"{DOMAIN}::{self.name}"

    def attribute(self, name: str) -> AttrSpec:
        for a in self.all_attributes:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no attribute {name!r}; valid: {[a.name for a in self.all_attributes]}")


_Q_DOC = "queries of the new chunk (its T tokens sit at true positions seq_lens[b]-T .. seq_lens[b]-1)"
_POOL = TensorSpec(
    name="kv_pool",
    types=FLOAT_TYPES,
    shape=("num_blocks", "2", "Hkv", "block_size", "D"),
    doc="this layer's paged KV pool (index 0 = K, 1 = V) holding the PAST tokens only "
    "(positions < seq_lens[b]-T); the chunk's K/V come in as k/v and the runtime appends them "
    "after the step. Must hold finite values (zero-initialised) in unused blocks.",
)
_BT = TensorSpec(
    name="block_table",
    types=("int32",),
    shape=("B", "max_blocks"),
    doc="logical -> physical block id; every entry, used or not, must be in [0, num_blocks) "
    "(pad unused entries with 0). max_blocks * block_size >= seq_lens[b] - T.",
)
_SEQ = TensorSpec(
    name="seq_lens",
    types=("int32",),
    shape=("B",),
    doc="true sequence lengths INCLUDING the T chunk tokens (past length = seq_lens - T).",
)
_SEL = TensorSpec(
    name="selection",
    types=("int32",),
    shape=("B", "Hkv", "S"),
    doc="selected logical block ids per KV head, padded with -1 (ids >= max_blocks are ignored). "
    "Past keys of unselected blocks are invisible; the chunk itself is always visible (causally).",
)
_SCALE = AttrSpec(name="scale", kind="float", minimum=0.0, doc="softmax scale (usually 1/sqrt(D)).")
_GEOMETRY = (
    AttrSpec(name="num_q_heads", kind="int", minimum=1, doc="Hq, query heads."),
    AttrSpec(name="num_kv_heads", kind="int", minimum=1, doc="Hkv, KV heads (Hq % Hkv == 0; GQA)."),
    AttrSpec(name="head_dim", kind="int", minimum=1, doc="D."),
    AttrSpec(name="block_size", kind="int", minimum=1, doc="tokens per KV block (pool axis 3)."),
    _SCALE,
)
_OUT = TensorSpec(
    name="output",
    types=FLOAT_TYPES,
    shape=("B", "Hq", "T", "D"),
    doc="attention output, same layout as q.",
)
_VISIBILITY = (
    "Key at logical position p is visible to the query at position i iff p <= i and "
    "(p >= seq_lens[b] - T, i.e. p is in the chunk, or p // block_size is in selection[b, kv_head]). "
    "Query head h reads KV head h // (Hq / Hkv)."
)

PAGED_SPARSE_ATTENTION = OpSchema(
    name="UcmPagedSparseAttention",
    version="1",
    summary="Block-sparse attention of a chunk of T queries over a paged KV pool (K stored post-RoPE).",
    semantics=(
        "Equals ucm_trt.reference.paged_sparse_attention(q, pool', block_table, seq_lens, selection, "
        "scale=scale) where pool' is kv_pool with the chunk's k/v appended at logical positions "
        "seq_lens-T .. seq_lens-1. " + _VISIBILITY + " Serves prefill (T > 1) and decode (T = 1)."
    ),
    inputs=(
        TensorSpec(name="q", types=FLOAT_TYPES, shape=("B", "Hq", "T", "D"), doc=_Q_DOC + ", post-RoPE."),
        TensorSpec(name="k", types=FLOAT_TYPES, shape=("B", "Hkv", "T", "D"), doc="keys of the chunk, post-RoPE."),
        TensorSpec(name="v", types=FLOAT_TYPES, shape=("B", "Hkv", "T", "D"), doc="values of the chunk."),
        _POOL,
        _BT,
        _SEQ,
        _SEL,
    ),
    outputs=(_OUT,),
    attributes=_GEOMETRY,
)

PAGED_REROPE_ATTENTION = OpSchema(
    name="UcmPagedReRoPEAttention",
    version="1",
    summary="ReRoPE attention of a chunk over a paged pool of UN-rotated keys (rotation in-op).",
    semantics=(
        "Equals ucm_trt.reference.paged_rerope_attention(q, pool', block_table, seq_lens, selection, "
        "window=rerope_window, theta=rope_theta, logn_training_length=(logn_training_length or None), "
        "scale=scale) with pool' = kv_pool plus the chunk's k/v appended. q and k are UN-rotated. "
        "Logit(i, j) = scale * rope(q_i, i).rope(k_j, j) if i - j < window, else "
        "scale * rope(q_i, window).k_j (relative distance clamped to the window). With "
        "logn_training_length > 0, q_i is first multiplied by max(1, log(i+1)/log(L)). "
        "RoPE is NeoX/rotate_half with inv_freq = theta^(-2j/D). " + _VISIBILITY
    ),
    inputs=(
        TensorSpec(name="q", types=FLOAT_TYPES, shape=("B", "Hq", "T", "D"), doc=_Q_DOC + ", UN-rotated."),
        TensorSpec(name="k", types=FLOAT_TYPES, shape=("B", "Hkv", "T", "D"), doc="keys of the chunk, UN-rotated."),
        TensorSpec(name="v", types=FLOAT_TYPES, shape=("B", "Hkv", "T", "D"), doc="values of the chunk."),
        _POOL,
        _BT,
        _SEQ,
        _SEL,
    ),
    outputs=(_OUT,),
    attributes=_GEOMETRY
    + (
        AttrSpec(name="rope_theta", kind="float", minimum=1.0, doc="RoPE base theta."),
        AttrSpec(name="rerope_window", kind="int", minimum=1, doc="ReRoPE window w."),
        AttrSpec(
            name="logn_training_length",
            kind="int",
            default=0,
            minimum=0,
            doc="training length L for log-n query scaling; 0 disables it (otherwise >= 2).",
        ),
    ),
)

SELECT_ALL_BLOCKS = OpSchema(
    name="UcmSelectAllBlocks",
    version="1",
    summary="Helper: the selection that keeps every logical block (dense layers, 'dense' algorithm).",
    semantics="selection[b, h, j] = j for j < max_blocks: every block of the block table is selected.",
    inputs=(_BT,),
    outputs=(TensorSpec(name="selection", types=("int32",), shape=("B", "Hkv", "max_blocks"), doc="all block ids."),),
    attributes=(AttrSpec(name="num_kv_heads", kind="int", minimum=1, doc="Hkv of the selection."),),
)


#: the graph input the rewriter feeds every split attention node's ``split_counters`` from
SPLIT_COUNTERS_INPUT = "attn_split_counters"

_COUNTERS = TensorSpec(
    name="split_counters",
    types=("int32",),
    shape=("split_counters",),
    doc="scratch of the split-K kernel: one int32 arrival counter per (row, KV head, query tile); ALL ZERO "
    "before the op, and the op leaves them zero (the program that merges a tile re-zeroes its counter), "
    "so one zeroed buffer serves every layer of a graph that runs its layers in order on one stream. At "
    "least as long as the most tiles of the largest (B, T) the op runs at (the engine builder sizes the "
    "graph input; the ONNX function body ignores it).",
)
_PARTIALS = TensorSpec(
    name="split_partials",
    types=("float",),
    shape=("split_partials",),
    doc="scratch of the split-K kernel (fp32 partial outputs and log-sum-exps of every split), written and "
    "read within the op: consumed by nothing. Its length is the plugin's launch rule's (an expression of B, "
    "T and num_sms); the ONNX function body, which has no splits, returns an empty tensor.",
)
_NUM_SMS = AttrSpec(
    name="num_sms",
    kind="int",
    default=0,
    minimum=0,
    doc="SM count of the GPU the engine is built for: the split count is the launch rule's for it "
    "(0 = not planned yet: the rewriter writes 0 and the engine builder, ucm-trt build --sms, stamps the "
    "build target's count; a TensorRT plugin refuses 0). Results never depend on it.",
)


def _split_variant(base: OpSchema, name: str) -> OpSchema:
    """``base`` with the split-K kernel's scratch as I/O (TensorRT's AOT launcher gives a kernel no
    workspace): ``split_counters`` an extra input, ``split_partials`` an extra output, ``num_sms`` an
    extra attribute. Output 0 and its semantics are ``base``'s."""
    return OpSchema(
        name=name,
        version="1",
        summary=base.summary + " Split-K variant: the kernel's scratch is op I/O.",
        semantics=(base.semantics + f" Output 'output' equals {base.name}'s on the same inputs and attributes; "
                   "'split_counters' (all zero, left zero) and 'split_partials' are the split-K kernel's scratch "
                   "and never change 'output'."),
        inputs=base.inputs + (_COUNTERS,),
        outputs=base.outputs + (_PARTIALS,),
        attributes=base.attributes + (_NUM_SMS,),
    )


PAGED_SPARSE_ATTENTION_SPLIT = _split_variant(PAGED_SPARSE_ATTENTION, "UcmPagedSparseAttentionSplitK")
PAGED_REROPE_ATTENTION_SPLIT = _split_variant(PAGED_REROPE_ATTENTION, "UcmPagedReRoPEAttentionSplitK")
#: the split-K variant of each paged attention op (the rewriter emits these; the base ops stay loadable)
SPLIT_OPS: Mapping[str, OpSchema] = {
    PAGED_SPARSE_ATTENTION.name: PAGED_SPARSE_ATTENTION_SPLIT,
    PAGED_REROPE_ATTENTION.name: PAGED_REROPE_ATTENTION_SPLIT,
}

SCHEMAS: Mapping[str, OpSchema] = {
    s.name: s for s in (PAGED_SPARSE_ATTENTION, PAGED_REROPE_ATTENTION, SELECT_ALL_BLOCKS,
                        PAGED_SPARSE_ATTENTION_SPLIT, PAGED_REROPE_ATTENTION_SPLIT)
}

# Released versions: (op, version) -> one-line note. Never change a released version's semantics.
VERSIONS: Mapping[tuple[str, str], str] = {
    ("UcmPagedSparseAttention", "1"): "initial",
    ("UcmPagedReRoPEAttention", "1"): "initial",
    ("UcmSelectAllBlocks", "1"): "initial",
    ("UcmPagedSparseAttentionSplitK", "1"): "the v1 op with the split-K scratch as I/O (issue 14)",
    ("UcmPagedReRoPEAttentionSplitK", "1"): "the v1 op with the split-K scratch as I/O (issue 14)",
}


def get_schema(name: str) -> OpSchema:
    """The schema of UCM op ``name``; an unknown name lists the valid ones."""
    try:
        return SCHEMAS[name]
    except KeyError:
        raise ValueError(f"unknown UCM op {name!r}; valid ops: {', '.join(sorted(SCHEMAS))}") from None


def node_attributes(schema: OpSchema, **values: int | float | str) -> dict[str, int | float | str]:
    """Full attribute dict for a node of ``schema``: validates, fills defaults, rejects unknown names."""
    known = {a.name for a in schema.all_attributes}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{schema.name} has no attribute(s) {unknown}; valid: {sorted(known)}")
    out: dict[str, int | float | str] = {}
    for a in schema.all_attributes:
        if a.name in values:
            out[a.name] = a.check(schema.name, values[a.name])
        elif a.default is not None:
            out[a.name] = a.default
        else:
            raise ValueError(f"{schema.name}.{a.name} is required ({a.doc})")
    if out["plugin_namespace"] != PLUGIN_NAMESPACE:
        raise ValueError(f"{schema.name}.plugin_namespace must be {PLUGIN_NAMESPACE!r}, got {out['plugin_namespace']!r}")
    if out["plugin_version"] != schema.version:
        raise ValueError(f"{schema.name}.plugin_version must be {schema.version!r}, got {out['plugin_version']!r}")
    if "num_q_heads" in out and out["num_q_heads"] % out["num_kv_heads"] != 0:  # type: ignore[operator]
        raise ValueError(
            f"{schema.name}.num_q_heads ({out['num_q_heads']}) must be a multiple of num_kv_heads ({out['num_kv_heads']})"
        )
    lt = out.get("logn_training_length")
    if lt == 1:
        raise ValueError(f"{schema.name}.logn_training_length must be 0 (off) or >= 2, got 1")
    return out


def render_markdown(schema: OpSchema) -> str:
    """The schema as a Markdown section (docs/graph.md embeds these verbatim; a test checks)."""
    lines = [f"### `{schema.qualified_name}` (version {schema.version})", "", schema.summary, "", schema.semantics, ""]
    lines += ["| input | types | shape | meaning |", "|---|---|---|---|"]
    lines += [f"| `{t.name}` | {', '.join(t.types)} | `[{', '.join(t.shape)}]` | {t.doc} |" for t in schema.inputs]
    lines += ["", "| output | types | shape | meaning |", "|---|---|---|---|"]
    lines += [f"| `{t.name}` | {', '.join(t.types)} | `[{', '.join(t.shape)}]` | {t.doc} |" for t in schema.outputs]
    lines += ["", "| attribute | type | default | rule / meaning |", "|---|---|---|---|"]
    for a in schema.all_attributes:
        default = "required" if a.default is None else f"`{a.default!r}`"
        rule = f">= {a.minimum:g}; " if a.minimum is not None else ""
        lines.append(f"| `{a.name}` | {a.kind} | {default} | {rule}{a.doc} |")
    return "\n".join(lines) + "\n"
