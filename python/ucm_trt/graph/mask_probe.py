"""Check that an attention mask of a graph is plain causal, by running the graph that computes it.

The UCM ops apply causal + block visibility themselves and drop the exporter's mask, so a mask
that hides more than the future (a sliding window, chunked or local attention) must not be
rewritten: the paged op would attend past the window. Config flags are not available for a foreign
graph, so the mask is checked numerically: the part of the graph that computes it (from the
conventional inputs ``input_ids``, ``attention_mask``, ``position_ids`` and the past KV) is
extracted and run on ONNX Runtime twice, and its visibility is compared with the causal rule
(key position ``j`` visible to query position ``i`` iff ``j <= i``):

* a prefill probe: ``past = 3``, ``T = 61`` new tokens (the causal triangle inside a chunk);
* a decode probe: ``T = 2`` tokens after a long past (``32768``, or more when the mask graph holds
  a larger integer constant, which could be a window), capped so one past KV input stays
  under 512 MiB. Windows longer than the probe's past are not detected.

A mask value counts as hidden when it is ``False`` (boolean masks) or below ``-1e4`` (additive).
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["probe_causal_mask"]

PREFILL = (3, 61)  # (past, new tokens)
DECODE_NEW = 2
MIN_DECODE_PAST = 32768
MAX_PAST_BYTES = 512 * 2**20


def _reads(node: onnx.NodeProto) -> list[str]:
    """Values ``node`` reads: its inputs and those of its subgraphs (If/Loop read outer values)."""
    out = list(node.input)
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            out.extend(i for sn in g.node for i in sn.input)
    return out


def _ancestor_inputs(graph: onnx.GraphProto, name: str) -> tuple[list[str], list[onnx.NodeProto]]:
    inputs = {i.name for i in graph.input}
    inits = {i.name for i in graph.initializer}
    by_output = {o: n for n in graph.node for o in n.output}
    need, seen, nodes, found = [name], set(), [], []
    while need:
        v = need.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in inputs:
            found.append(v)
            continue
        if v in inits:
            continue
        n = by_output.get(v)
        if n is None:
            continue
        nodes.append(n)
        need.extend(_reads(n))
    return [i.name for i in graph.input if i.name in found], nodes


def _subgraph_model(model: onnx.ModelProto, inputs: list[str], nodes: list[onnx.NodeProto], output: str,
                    elem_type: int) -> onnx.ModelProto:
    """The nodes computing ``output`` from graph ``inputs`` (original order), as a model of their own."""
    graph = model.graph
    keep = {id(n) for n in nodes}
    ordered = [n for n in graph.node if id(n) in keep]
    read = {i for n in ordered for i in _reads(n)}
    g = onnx.helper.make_graph(
        ordered, "ucm_mask_probe", [i for i in graph.input if i.name in inputs],
        [onnx.helper.make_tensor_value_info(output, elem_type, None)],
        initializer=[t for t in graph.initializer if t.name in read],
    )
    sub = onnx.helper.make_model(g, opset_imports=list(model.opset_import), functions=list(model.functions))
    sub.ir_version = model.ir_version
    return sub


def _largest_int_constant(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> int:
    inits = {i.name: i for i in graph.initializer}
    best = 0
    arrays = []
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    arrays.append(onnx.numpy_helper.to_array(a.t))
                elif a.name in ("value_int", "value_ints"):
                    arrays.append(np.array(a.i if a.name == "value_int" else list(a.ints)))
        for i in n.input:
            if i in inits and np.prod(inits[i].dims, dtype=np.int64) <= 64:
                arrays.append(onnx.numpy_helper.to_array(inits[i]))
    for arr in arrays:
        if arr.dtype.kind in "iu" and arr.size:
            vals = np.abs(arr.astype(np.int64))
            vals = vals[vals < 2**20]
            if vals.size:
                best = max(best, int(vals.max()))
    return best


def _feeds(graph: onnx.GraphProto, names: list[str], past_shapes: dict[str, tuple[int, int]],
           past: int, new: int) -> dict[str, np.ndarray] | str:
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    out = {}
    for name in names:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])
        if name == "input_ids":
            out[name] = np.zeros((1, new), dtype=dtype)
        elif name == "attention_mask":
            out[name] = np.ones((1, past + new), dtype=dtype)
        elif name == "position_ids":
            out[name] = np.arange(past, past + new, dtype=dtype)[None]
        elif name in past_shapes:
            hkv, d = past_shapes[name]
            out[name] = np.zeros((1, hkv, past, d), dtype=dtype)
        else:
            return f"the attention mask depends on graph input {name!r}, which the causality probe cannot feed"
    return out


def _visibility(mask: np.ndarray, past: int, new: int) -> np.ndarray | str:
    m = np.asarray(mask)
    while m.ndim > 2:
        m = m[0]  # batch / head dims: the probe has one row and all heads share the mask
    try:
        m = np.broadcast_to(m, (new, past + new))
    except ValueError:
        return f"the attention mask has shape {tuple(mask.shape)}, expected [..., {new}, {past + new}] in the probe"
    return m if m.dtype == np.bool_ else m > -1e4


def probe_causal_mask(model: onnx.ModelProto, mask_name: str, past_shapes: dict[str, tuple[int, int]],
                      *, mask_elem_type: int = onnx.TensorProto.FLOAT, causal_applied: bool = False) -> str | None:
    """``None`` when the value ``mask_name`` of ``model`` is a plain causal mask in both probes,
    else the reason it is not (or why it could not be checked).

    ``past_shapes``: past-KV graph input name -> (KV heads, head dim), for the probe's feeds.
    ``mask_elem_type``: ONNX element type of the mask value (the probe model's output type).
    ``causal_applied``: the attention op applies causality itself (``is_causal=1``, GQA), so the
    mask may show future keys; it must still hide nothing that causality shows.
    """
    import onnxruntime as ort

    graph = model.graph
    names, nodes = _ancestor_inputs(graph, mask_name)
    if not nodes and mask_name not in {i.name for i in graph.input}:
        return None if mask_name in {i.name for i in graph.initializer} else f"mask {mask_name!r} has no producer"
    if not names:
        return None  # a constant mask (fixed shapes): nothing input-dependent to probe
    per_pos = max((hkv * d for hkv, d in past_shapes.values()), default=1) * 4
    decode_past = max(MIN_DECODE_PAST, _largest_int_constant(graph, nodes) + 8)
    decode_past = min(decode_past, max(PREFILL[0] + PREFILL[1], MAX_PAST_BYTES // per_pos))
    try:
        sub = _subgraph_model(model, names, nodes, mask_name, mask_elem_type)
        sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure to build the probe is reported, not hidden
        return f"could not extract the subgraph computing the attention mask to check it is causal: {exc}"
    for past, new in (PREFILL, (decode_past, DECODE_NEW)):
        feeds = _feeds(graph, names, past_shapes, past, new)
        if isinstance(feeds, str):
            return feeds
        try:
            (mask,) = sess.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            return f"could not run the subgraph computing the attention mask (past {past}, {new} tokens): {exc}"
        vis = _visibility(mask, past, new)
        if isinstance(vis, str):
            return vis
        q = past + np.arange(new)[:, None]
        k = np.arange(past + new)[None, :]
        causal = k <= q
        if not causal_applied and (vis & ~causal).any():
            i, j = (int(x[0]) for x in np.nonzero(vis & ~causal))
            return (f"the attention mask lets the query at position {past + i} see the later key {j}: not causal "
                    "self-attention")
        hidden = ~vis & causal
        if hidden.any():
            i, j = (int(x[-1]) for x in np.nonzero(hidden))
            qpos = past + i
            return (f"the attention mask hides key {j} from the query at position {qpos} (about {qpos - j} tokens "
                    "back): a sliding window or other restriction the paged UCM ops do not apply; rewriting "
                    "would attend past it")
    return None
