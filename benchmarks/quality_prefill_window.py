"""Prefill observation window: does ESA's / GSA's first selection keep the answer's block? (issue 15, CPU)

For retrieval-grid prompts (passkey / multi-key; a tuning seed, not the reported grid's), one dense
prefill each (SmolLM2, post-RoPE Q/K of every layer captured), then per layer the first retrieval of the
default scoring (per-head softmax vote over 8-token sub-block means, per-KV-head selection, block 32,
ratio 1/8, sink 1 + local 2) from the last ``W`` prompt queries (``PrefillWindow(tokens=W, reduce)``,
:func:`ucm_trt.sparse.policies.esa.window_block_scores`) for several ``W`` and both reductions. Prints,
per setting, the (layer, KV head) selections that keep a block holding the answer (the asked key's
tokens), over all layers and over the layers where the oracle (the true top blocks of the last prompt
query's attention at the same budget) keeps it, and the prompts where at least ``--min-layers`` layers
keep it.

    PYTHONPATH=python python benchmarks/quality_prefill_window.py --seed 1 > /tmp/window_tuning.txt

``--explain GRID.json METHOD``: for every prompt of a grid file that dense answers right and METHOD
(``esa`` / ``gsa``, default preset) does not, one dense forward of the prompt followed by dense's answer
(teacher forced) and, per layer, whether the default scoring keeps a block of the answer at the first
retrieval (the prefill window) and at each decode query of dense's answer (the query that produces
answer token ``i``), next to the oracle's selection for the same query and the layers detected dense.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.config import Budget, SparseConfig  # noqa: E402
from ucm_trt.eval.grid import build_grid_prompt  # noqa: E402
from ucm_trt.models import forward_with_capture, haystack_text, load_smollm2  # noqa: E402
from ucm_trt.sparse.policies.base import select_from_scores  # noqa: E402
from ucm_trt.sparse.policies.esa import window_block_scores  # noqa: E402
from ucm_trt.sparse.recall import oracle_selection  # noqa: E402
from ucm_trt.sparse.representations import block_submeans, tokens_to_blocks  # noqa: E402


def answer_blocks(tok, input_ids: list[int], answer: str, bs: int) -> set[int]:
    """Blocks holding a token of any occurrence of ``answer`` in the prompt."""
    text = tok.decode(input_ids)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    out: set[int] = set()
    start = text.find(answer)
    while start >= 0:
        end = start + len(answer)
        out |= {i // bs for i, (x, y) in enumerate(enc["offset_mapping"]) if x < end and y > start}
        start = text.find(answer, end)
    return out


def explain(model, tok, hay, grid_file: Path, method: str, bs: int, ratio: float, sbt: int, window) -> None:
    """Per failing prompt of ``grid_file``: the layers whose selection keeps the answer's block (see the
    module docstring)."""
    import json

    from ucm_trt.config import DenseLayers
    from ucm_trt.sparse.dense_layers import detect_dense_layers

    d = json.loads(grid_file.read_text())
    recs = d["records"]
    dense_ok = {(r["task"], r["context_len"], r["depth"], r["sample"]): r for r in recs
                if r["method"] == "dense" and r["correct"]}
    seed = d["meta"]["config"]["seed"]
    sparse = SparseConfig(block_size=bs, budget=Budget.ratio(ratio), selection="per_head")
    rule = DenseLayers(auto=True, threshold=0.7)
    for r in recs:
        key = (r["task"], r["context_len"], r["depth"], r["sample"])
        if r["method"] != method or r["correct"] or key not in dense_ok:
            continue
        pr = build_grid_prompt(tok, hay, task=r["task"], context_len=r["context_len"], depth=r["depth"],
                               sample=r["sample"], seed=seed)
        needle = answer_blocks(tok, pr.input_ids, pr.answers[0], bs)
        answer_ids = tok(dense_ok[key]["completion"], add_special_tokens=False)["input_ids"][:7]
        ids = pr.input_ids + answer_ids
        n = len(pr.input_ids)
        _, caps = forward_with_capture(model, torch.tensor([ids]), None)
        qs = [caps[layer][0][0].float() for layer in sorted(caps)]  # per layer [Hq, T, D]
        ks = [caps[layer][1][0].float() for layer in sorted(caps)]  # per layer [Hkv, T, D]
        dense, _ = detect_dense_layers([q[:, n - 1 : n] for q in qs],
                                       lambda layer, ks=ks, n=n: tokens_to_blocks(ks[layer][:, :n], bs)[0], n,
                                       sparse, rule)
        # decode step i (1-based) reads answer token i-1 at position n-1+i: its query's retrieval serves the
        # next steps (answer token 0 comes from the dense prefill; the window's selection serves step 1)
        steps = [("window", None)] + [(f"q{i}", n - 1 + i) for i in range(1, len(answer_ids))]
        print(f"\n{r['task']} {r['context_len']} depth {r['depth']} sample {r['sample']}: answer {pr.answers[0]} in "
              f"block(s) {sorted(needle)}; dense {dense_ok[key]['completion'].strip()!r}, {method} "
              f"{r['completion'].strip()!r}; dense layers {sorted(dense)}")
        for name, pos in steps:
            kept, orc_kept = [], []
            for layer, (q, k) in enumerate(zip(qs, ks, strict=True)):
                t = n if pos is None else pos + 1  # keys up to the query (causal)
                kb, lens = tokens_to_blocks(k[:, :t], bs)
                nb = kb.shape[0]
                reps = block_submeans(kb, lens, bs // sbt).permute(1, 2, 0)[None]
                qq = q[None, :, n - window.tokens : n] if pos is None else q[None, :, pos]
                s = window_block_scores(qq, reps, bs // sbt, True, window.reduce)[0]
                sel = select_from_scores(s, nb, sparse, "dot", k.shape[0])
                cand = sparse.budget.num_blocks(nb - sparse.forced_blocks)
                qo = q[None, :, n - 1 : n] if pos is None else q[None, :, pos : pos + 1]
                orc = oracle_selection(qo, k[None, :, :t], block_size=bs, counts=cand, sink_blocks=sparse.sink_blocks,
                                       local_blocks=sparse.local_blocks, mode="per_head")[0]
                if set(sel.flatten().tolist()) & needle:
                    kept.append(layer)
                if set(orc.flatten().tolist()) & needle:
                    orc_kept.append(layer)
            sparse_layers = [x for x in range(len(qs)) if x not in dense]
            print(f"  {name:>6}: kept in {len([x for x in kept if x in sparse_layers]):>2} of "
                  f"{len(sparse_layers)} sparse layers {[x for x in kept if x in sparse_layers]}; oracle "
                  f"{[x for x in orc_kept if x in sparse_layers]}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="grid prompt seed (the reported grid uses 0)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--tasks", nargs="+", default=["passkey", "multikey"])
    p.add_argument("--windows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.125)
    p.add_argument("--sub-block-tokens", type=int, default=8)
    p.add_argument("--min-layers", type=int, default=3)
    p.add_argument("--explain", nargs=2, metavar=("GRID.json", "METHOD"), default=None,
                   help="per failing prompt of METHOD (esa / gsa, default preset) in a grid file: which layers keep "
                        "the answer's block at the first retrieval and at each decode query")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bs, sbt = args.block_size, args.sub_block_tokens
    model, tok = load_smollm2()
    hay = haystack_text(source="essays")
    if args.explain:
        from ucm_trt.runtime.algorithms import DEFAULT_PREFILL_WINDOW

        explain(model, tok, hay, Path(args.explain[0]), args.explain[1], bs, args.ratio, sbt, DEFAULT_PREFILL_WINDOW)
        return 0
    sparse = SparseConfig(block_size=bs, budget=Budget.ratio(args.ratio), selection="per_head")
    settings = [(w, r) for w in args.windows for r in (("mean", "max") if w > 1 else ("mean",))]
    # setting -> [kept, selections, kept where the oracle keeps, oracle keeps, prompts with >= min-layers]
    tally = {s: [0, 0, 0, 0, 0] for s in settings}
    n_prompts = 0
    for sample in range(args.samples):
        for length in args.lengths:
            for task in args.tasks:
                for depth in args.depths:
                    pr = build_grid_prompt(tok, hay, task=task, context_len=length, depth=depth, sample=sample,
                                           seed=args.seed)
                    needle = answer_blocks(tok, pr.input_ids, pr.answers[0], bs)
                    _, caps = forward_with_capture(model, torch.tensor([pr.input_ids]), None)
                    n_prompts += 1
                    per_prompt = {s: 0 for s in settings}
                    for q, k in caps.values():
                        q, k = q[0].float(), k[0].float()  # [Hq, T, D], [Hkv, T, D]
                        hkv = k.shape[0]
                        kb, lens = tokens_to_blocks(k, bs)  # [nb, Hkv, bs, D]
                        nb = kb.shape[0]
                        reps = block_submeans(kb, lens, bs // sbt).permute(1, 2, 0)[None]  # [1, Hkv, D, nb*S]
                        cand = sparse.budget.num_blocks(nb - sparse.forced_blocks)
                        orc = oracle_selection(q[None, :, -1:], k[None], block_size=bs, counts=cand,
                                               sink_blocks=sparse.sink_blocks, local_blocks=sparse.local_blocks,
                                               mode="per_head")[0]  # [Hkv, S]
                        for w, r in settings:
                            s = window_block_scores(q[None, :, -w:], reps, bs // sbt, True, r)[0]  # [Hkv, nb]
                            sel = select_from_scores(s, nb, sparse, "dot", hkv)
                            t = tally[(w, r)]
                            layer_hit = False
                            for h in range(hkv):
                                hit = bool(set(sel[h].tolist()) & needle)
                                o_hit = bool(set(orc[h].tolist()) & needle)
                                t[0] += hit
                                t[1] += 1
                                t[2] += hit and o_hit
                                t[3] += o_hit
                                layer_hit |= hit
                            per_prompt[(w, r)] += layer_hit
                    for s in settings:
                        tally[s][4] += per_prompt[s] >= args.min_layers
                    print(f"{task} {length} depth {depth} sample {sample}: answer in block(s) {sorted(needle)}; "
                          "layers keeping it: " + ", ".join(f"W={w}/{r}: {per_prompt[(w, r)]}" for w, r in settings),
                          flush=True)
    print(f"\n{n_prompts} prompts (seed {args.seed}), block {bs}, ratio {args.ratio}, per-head vote over "
          f"{sbt}-token sub-block means; first selection from the last W prompt queries")
    print(f"{'W':>3} {'reduce':<6} {'kept / (layer, KV head)':>24} {'kept where the oracle keeps':>28} "
          f"{'prompts >= ' + str(args.min_layers) + ' layers':>20}")
    for (w, r), (kept, n, both, orc, prompts) in tally.items():
        print(f"{w:>3} {r:<6} {kept:>9} / {n:<5} ({kept / n:.2f}) {both:>12} / {orc:<5} ({both / max(orc, 1):.2f}) "
              f"{prompts:>12} / {n_prompts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
