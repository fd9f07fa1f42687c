"""Needle retention per layer (issue 15 diagnostic, CPU, a few minutes).

For SmolLM2 passkey / multi-key prompts (the retrieval grid's prompts), at the last prompt query
(what ESA's first retrieval scores with), block 32, ratio 0.125: in how many layers does each
scoring keep the block holding the answer, and in how many of the layers where the oracle (the
true top blocks by attention mass) keeps it? Compares upstream's ``mean/dot`` (group-mean query)
and Quest's ``minmax/quest`` with the per-head softmax vote over mean K / the Quest bound
(``mean/vote``, ``minmax/vote``), for shared and per-head selections.

    PYTHONPATH=python python benchmarks/quality_needle_layers.py > benchmarks/results/quality/needle_layers_cpu.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.config import Budget, SparseConfig  # noqa: E402
from ucm_trt.eval.grid import build_grid_prompt  # noqa: E402
from ucm_trt.models import forward_with_capture, haystack_text, load_smollm2  # noqa: E402
from ucm_trt.sparse.policies._reps import host_scores, host_vote_scores  # noqa: E402
from ucm_trt.sparse.recall import oracle_selection  # noqa: E402
from ucm_trt.sparse.representations import block_mean, block_minmax, tokens_to_blocks  # noqa: E402
from ucm_trt.sparse.score import reduce_scores  # noqa: E402
from ucm_trt.sparse.select import select_blocks  # noqa: E402

BS = 32
RATIO = 0.125
PROMPTS = [(1024, 0.5, "passkey"), (1024, 0.9, "multikey"), (2048, 0.3, "passkey"), (2048, 0.7, "passkey"),
           (1024, 0.1, "passkey"), (2048, 0.5, "multikey")]


def answer_blocks(tok, prompt) -> set[int]:
    text = tok.decode(prompt.input_ids)
    a = text.find(prompt.answers[0])
    b = a + len(prompt.answers[0])
    enc = tok(text, return_offsets_mapping=True)
    return {i // BS for i, (x, y) in enumerate(enc["offset_mapping"]) if x < b and y > a}


def main() -> int:
    torch.set_num_threads(1)
    model, tok = load_smollm2()
    hay = haystack_text(source="essays")
    counts: dict[tuple[str, str], list[int]] = {}  # (selection, method) -> [layers, kept, kept where oracle kept]
    for length, depth, task in PROMPTS:
        p = build_grid_prompt(tok, hay, task=task, context_len=length, depth=depth, sample=0)
        needle = answer_blocks(tok, p)
        _, caps = forward_with_capture(model, torch.tensor([p.input_ids]), None)
        for mode in ("shared", "per_head"):
            sparse = SparseConfig(block_size=BS, budget=Budget.ratio(RATIO), selection=mode)
            for q, k in caps.values():
                q, k = q[0].float(), k[0].float()  # [Hq, T, D], [Hkv, T, D]
                hkv = k.shape[0]
                kb, lens = tokens_to_blocks(k, BS)
                nb = kb.shape[0]
                mean = block_mean(kb, lens).permute(1, 2, 0)[None]  # [1, Hkv, D, nb]
                kmin, kmax = (x.permute(1, 2, 0)[None] for x in block_minmax(kb, lens))
                ql = q[None, :, -1]  # [1, Hq, D]
                scores = {"mean/dot": host_scores(mean, ql)[0], "minmax/quest": host_scores((kmin, kmax), ql)[0],
                          "mean/vote": host_vote_scores(ql, mean)[0],
                          "minmax/vote": host_vote_scores(ql, (kmin, kmax))[0]}
                orc = oracle_selection(q[None, :, -1:], k[None], block_size=BS, counts=Budget.ratio(RATIO).num_blocks(nb - 3),
                                       sink_blocks=1, local_blocks=2, mode=mode)[0]
                o_hit = bool(set(orc.flatten().tolist()) & needle)
                for name, s in scores.items():
                    s2 = reduce_scores(s[None], "dot") if mode == "shared" else s[None]
                    sel = select_blocks(s2, torch.tensor([nb], dtype=torch.int32), sparse, num_kv_heads=hkv)[0]
                    hit = bool(set(sel.flatten().tolist()) & needle)
                    c = counts.setdefault((mode, name), [0, 0, 0])
                    c[0], c[1], c[2] = c[0] + 1, c[1] + hit, c[2] + (hit and o_hit)
                c = counts.setdefault((mode, "oracle"), [0, 0, 0])
                c[0], c[1], c[2] = c[0] + 1, c[1] + o_hit, c[2] + o_hit
        print(f"{length} tokens, depth {depth}, {task}: answer in block(s) {sorted(needle)}", flush=True)
    print(f"\nblock {BS}, ratio {RATIO}, {len(PROMPTS)} prompts x 30 layers, last prompt query")
    print(f"{'selection':<9} {'method':<13} {'layers keeping the answer':>26} {'of the oracle''s':>16}")
    for (mode, name), (n, hit, both) in sorted(counts.items()):
        orc = counts[(mode, "oracle")][1]
        print(f"{mode:<9} {name:<13} {hit:>20} / {n:<4} {both:>9} / {orc:<4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
