"""Why does a sparse method lose an answer whose block is selected? A per-step trace (issue 15, CPU).

For grid prompts (:func:`ucm_trt.eval.grid.build_grid_prompt`), the method runs through the generation
runtime exactly as the grid runs it (:func:`ucm_trt.eval.grid.method_engine`, one batch), and the
selections attention actually read at every decode step (after the overlapped schedule's stale-by-one
substitution) are recorded per layer and KV head. Then, per prompt that dense answers right and the
method does not:

* the first wrong decode step (step ``i`` produces answer token ``i``; token 0 comes from the dense
  prefill);
* the *retrieval heads* of that prompt: the (layer, KV head) pairs whose query heads put at least
  ``--head-mass`` of their attention on the answer's tokens in the needle when dense produces the
  answer (one teacher-forced dense forward over prompt + dense's answer);
* per decode step up to the first wrong one, whether the selection each layer / retrieval head read
  held the *source block* of the token being produced (the block(s) holding that digit of the key
  in the needle), and all of the needle's blocks.

``--force needle`` re-runs the method with every block of the answer's needle(s) added to every
selection (all layers, all KV heads, every step): if the answers come back, what the method lost is
the needle's blocks somewhere in the network; if they do not, it is the rest of the selection.
``--force none`` (default) only traces.

    PYTHONPATH=python python benchmarks/quality_trace.py --seed 1 --lengths 1024 --method esa
    PYTHONPATH=python python benchmarks/quality_trace.py --seed 1 --lengths 1024 --method esa --force needle
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.eval.grid import GridConfig, build_grid_prompt, method_engine  # noqa: E402
from ucm_trt.models import forward_with_capture, haystack_text, load_smollm2  # noqa: E402


def answer_token_positions(tok, input_ids: list[int], answer: str) -> list[list[int]]:
    """Per character of ``answer``: the prompt token positions that hold it (every occurrence)."""
    text = tok.decode(input_ids)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    if enc["input_ids"] != list(input_ids):
        raise ValueError("the prompt does not re-tokenise to the same ids; cannot map the answer to tokens")
    per_char: list[list[int]] = [[] for _ in answer]
    start = text.find(answer)
    while start >= 0:
        for c in range(len(answer)):
            per_char[c] += [i for i, (x, y) in enumerate(enc["offset_mapping"]) if x <= start + c < y]
        start = text.find(answer, start + len(answer))
    return per_char


def forced_plan(policy, extra: dict[str, list[int]]):
    """Wrap ``policy.plan`` so that every selection of request ``rid`` also holds ``extra[rid]`` (all KV
    heads); the same input tensor gives the same output tensor (the runtime caches by identity)."""
    plan = policy.plan
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def wrapped(self, reqs):
        out = plan(reqs)
        for per_row in out:
            for row, sel in enumerate(per_row):
                blocks = extra.get(reqs[row].rid)
                if sel is None or not blocks:
                    continue
                hit = cache.get(id(sel))
                if hit is None or hit[0] is not sel:
                    add = torch.tensor(blocks, dtype=sel.dtype)
                    rows = [torch.unique(torch.cat([r[r >= 0], add])) for r in sel]
                    width = max(len(r) for r in rows)
                    new = torch.full((sel.shape[0], width), -1, dtype=sel.dtype)
                    for h, r in enumerate(rows):
                        new[h, : len(r)] = r
                    hit = cache[id(sel)] = (sel, new)
                per_row[row] = hit[1]
        return out

    policy.plan = types.MethodType(wrapped, policy)


def run_traced(backend, method: str, budget: float, prompts, cfg: GridConfig, force: dict[str, list[int]] | None):
    """Generate every prompt in one batch; returns (token ids per prompt, the attended selections per prompt:
    a list over decode steps of per-layer ``[Hkv, S]`` int tensors or None = every block)."""
    from ucm_trt.runtime import SamplingParams

    lens = [len(p.input_ids) for p in prompts]
    engine = method_engine(backend, method, budget, max_prompt_len=max(lens), min_prompt_len=min(lens),
                           max_new_tokens=max(p.max_new_tokens for p in prompts), cfg=cfg)
    trace: dict[str, list[list[torch.Tensor | None]]] = {f"p{i}": [] for i in range(len(prompts))}
    if force:
        forced_plan(engine.policy, force)
    write = engine._write_selections  # the selections attention reads this step (after the stale substitution)

    def recording(sels, *args):
        rows = list(engine._running)
        for row, rid in enumerate(rows):
            trace[rid].append([None if s[row] is None else s[row].clone() for s in sels])
        return write(sels, *args)

    engine._write_selections = recording
    try:
        for i, p in enumerate(prompts):
            engine.add_request(p.input_ids, SamplingParams(max_new_tokens=p.max_new_tokens), request_id=f"p{i}")
        while engine.has_work:
            engine.step()
        out = [engine.result(f"p{i}").token_ids for i in range(len(prompts))]
    finally:
        engine.close()
    traces = [trace[f"p{i}"] for i in range(len(prompts))]
    # the layers a request ran dense: those whose first decode step read every block
    dense_layers = [[layer for layer, s in enumerate(t[0]) if s is None] if t else [] for t in traces]
    return out, traces, dense_layers


def retrieval_heads(capture_model, ids: list[int], n: int, src: list[set[int]], hkv: int, min_mass: float):
    """Per answer token ``i >= 1`` (the query at position ``n - 1 + i``): ``{(layer, kv_head): mass}`` of the
    KV heads whose query heads (mean over the group) put at least ``min_mass`` of their attention on the
    answer's needle tokens ``src`` (all digits)."""
    _, caps = forward_with_capture(capture_model, torch.tensor([ids]), None)
    needle = sorted(set().union(*src))
    out: list[dict[tuple[int, int], float]] = []
    for i in range(1, len(ids) - n + 1):
        pos = n - 1 + i
        heads: dict[tuple[int, int], float] = {}
        for layer in sorted(caps):
            q, k = caps[layer][0][0].float(), caps[layer][1][0].float()  # [Hq, T, D], [Hkv, T, D]
            g = q.shape[0] // hkv
            logits = torch.einsum("hd,htd->ht", q[:, pos], k[:, : pos + 1].repeat_interleave(g, 0)) / q.shape[-1] ** 0.5
            p = logits.softmax(-1)[:, needle].sum(-1).reshape(hkv, g).mean(-1)
            for h in range(hkv):
                if float(p[h]) >= min_mass:
                    heads[(layer, h)] = float(p[h])
        out.append(heads)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="grid prompt seed (the reported grid uses 0)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, nargs="+", default=[0])
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    p.add_argument("--method", default="esa", help="grid method name (algorithm[@preset][+sync][+wN...])")
    p.add_argument("--budget", type=float, default=0.125)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--head-mass", type=float, default=0.3,
                   help="a KV head is a retrieval head of a prompt when its query heads put this much attention "
                        "on the answer's needle tokens at a decode step of dense's answer")
    p.add_argument("--force", choices=("none", "needle"), default="none",
                   help="needle: add every block of the answer's needle(s) to every selection")
    p.add_argument("--all", action="store_true", help="trace the prompts the method answers right too")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    model.eval()
    capture_model, _ = load_smollm2()  # SDPA attention for the Q/K capture (the backend swaps model's)
    capture_model.eval()
    hay = haystack_text(source="essays")
    from ucm_trt.runtime import TorchBackend

    backend = TorchBackend(model)
    hkv = backend.shape.num_kv_heads
    bs = args.block_size
    cfg = GridConfig(tasks=tuple(args.tasks), methods=("dense", args.method), budgets=(args.budget,),
                     lengths=tuple(args.lengths), depths=tuple(args.depths), samples=max(args.samples) + 1,
                     block_size=bs, batch=max(1, len(args.tasks) * len(args.depths)), prefill_chunk=512,
                     seed=args.seed)
    for sample in args.samples:
        for length in args.lengths:
            prompts = [build_grid_prompt(tok, hay, task=t, context_len=length, depth=d, sample=sample, seed=args.seed)
                       for t in args.tasks for d in args.depths]
            srcs = [answer_token_positions(tok, pr.input_ids, pr.answers[0]) for pr in prompts]
            needle_blocks = [sorted({t // bs for c in s for t in c}) for s in srcs]
            dense_out, _, _ = run_traced(backend, "dense", None, prompts, cfg, None)
            force = ({f"p{i}": nb for i, nb in enumerate(needle_blocks)} if args.force == "needle" else None)
            out, traces, dense_layers = run_traced(backend, args.method, args.budget, prompts, cfg, force)
            print(f"\n=== seed {args.seed} sample {sample} length {length}: {args.method} at {args.budget} "
                  f"(force {args.force}) [{time.perf_counter() - t0:.0f} s]", flush=True)
            for i, pr in enumerate(prompts):
                d_txt = tok.decode(dense_out[i], skip_special_tokens=True)
                m_txt = tok.decode(out[i], skip_special_tokens=True)
                d_ok, m_ok = pr.is_correct(d_txt), pr.is_correct(m_txt)
                head = (f"{pr.task} {length} d{pr.depth} s{sample}: key {pr.answers[0]} needle blocks {needle_blocks[i]}"
                        f"; dense {d_txt.strip()!r} ({'right' if d_ok else 'wrong'}), {args.method} {m_txt.strip()!r} "
                        f"({'right' if m_ok else 'wrong'}); dense layers {dense_layers[i]}")
                print(head, flush=True)
                if not d_ok or (m_ok and not args.all):
                    continue
                first = next((j for j, (a, b) in enumerate(zip(dense_out[i], out[i], strict=False)) if a != b), None)
                print(f"  first wrong token: {first} (dense {tok.decode([dense_out[i][first]])!r}, "
                      f"{args.method} {tok.decode([out[i][first]])!r})" if first is not None else "  same tokens")
                # source tokens of answer token j: the needle positions of the key's digits that token j spells
                key = pr.answers[0]
                n = len(pr.input_ids)
                ids = pr.input_ids + dense_out[i]
                heads = retrieval_heads(capture_model, ids[: n + len(key) + 1], n, [set(c) for c in srcs[i]], hkv,
                                        args.head_mass)
                full = tok.decode(dense_out[i])
                kstart = full.find(key)
                last = first if first is not None else len(dense_out[i]) - 1
                steps_src: list[list[int]] = []
                for j in range(1, min(last + 1, len(dense_out[i]))):  # token 0: the dense prefill's
                    lo, hi = len(tok.decode(dense_out[i][:j])), len(tok.decode(dense_out[i][: j + 1]))
                    chars = [c - kstart for c in range(lo, hi) if kstart >= 0 and 0 <= c - kstart < len(key)]
                    src_blocks = sorted({t // bs for c in chars for t in srcs[i][c]})
                    sels = traces[i][j - 1]  # decode step j (1-based) produced token j
                    rh = heads[j - 1] if j - 1 < len(heads) else {}
                    sparse_layers = [layer for layer, s in enumerate(sels) if s is not None]
                    layer_src = [layer for layer in sparse_layers
                                 if src_blocks and any(set(s.tolist()) & set(src_blocks) for s in sels[layer])]
                    layer_all = [layer for layer in sparse_layers
                                 if all(set(needle_blocks[i]) <= set(s.tolist()) for s in sels[layer])]
                    rh_kept = [f"L{lay}h{h}" for (lay, h) in rh if sels[lay] is None or
                               (set(sels[lay][h].tolist()) & set(src_blocks))]
                    rh_miss = [f"L{lay}h{h}:{m:.2f}" for (lay, h), m in sorted(rh.items()) if sels[lay] is not None and
                               not set(sels[lay][h].tolist()) & set(src_blocks)]
                    print(f"  step {j} -> {tok.decode([dense_out[i][j]])!r} (source blocks {src_blocks}): "
                          f"source kept in {len(layer_src)}/{len(sparse_layers)} sparse layers (any head), whole needle "
                          f"in all heads of {len(layer_all)}; retrieval heads {len(rh)}: kept {len(rh_kept)}, "
                          f"missed {rh_miss}", flush=True)
                    steps_src.append(src_blocks)
                # every retrieval head of the prompt (any step): did the selection it read hold the needle, per step
                # (1 = a block of the needle, . = none; step 1 reads the first retrieval's selection)
                all_rh = sorted({h for st in heads for h in st})
                marks = []
                for lay, h in all_rh:
                    row = "".join("D" if traces[i][j][lay] is None else
                                  ("1" if set(traces[i][j][lay][h].tolist()) & set(needle_blocks[i]) else ".")
                                  for j in range(len(traces[i])))
                    marks.append(f"L{lay}h{h}:{row}")
                print(f"  needle in the retrieval heads' selections, steps 1..{len(traces[i])}: " + " ".join(marks))
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
