"""The quality pipeline end to end at a tiny size (asserting the pipeline, not a score)."""

from __future__ import annotations

import argparse
import json

import pytest

from ucm_trt.eval.command import configure_eval_parser, run_eval_command
from ucm_trt.eval.methods import BlockBudget, budget_total_blocks, candidate_counts
from ucm_trt.eval.report import (
    accuracy_summary,
    detect_rollback_layers,
    layer_table,
    passkey_grid,
    recall_summary,
    render_quality_tables,
)
from ucm_trt.eval.results import ResultStore, cell_key
from ucm_trt.eval.suite import AccuracyConfig, RecallSweepConfig, RuntimePasskeyConfig


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    configure_eval_parser(p)
    return p.parse_args(list(argv))


def test_eval_quick_pipeline_and_resume(tmp_path, tiny_model, tiny_tokenizer, filler, capsys):
    out = tmp_path / "q"
    kw = dict(model=tiny_model, tokenizer=tiny_tokenizer, haystack=filler)
    with pytest.raises(ValueError, match="--out .* does not exist .*--make-dirs"):  # never created unasked
        run_eval_command(_args("--quick", "--out", str(out), "--no-progress"), **kw)
    assert not out.exists()
    assert run_eval_command(_args("--quick", "--out", str(out), "--no-progress", "--make-dirs"), **kw) == 0
    printed = capsys.readouterr().out  # the tables are printed, not only written as JSON
    assert "Attention-mass recall" in printed and "Accuracy vs sparsity" in printed
    assert "Passkey through the runtime" in printed and "| esa | 0.1 |" in printed and f"results: {out}/" in printed
    recall = ResultStore(out / "recall.json")
    acc = ResultStore(out / "accuracy.json")
    rt = ResultStore(out / "runtime_passkey.json")
    # recall: layers {0, 1} of the 2-layer model x block size 32 x per_head, one essay prompt
    cells = recall.cells("recall")
    assert sorted(c["layer"] for c in cells) == [0, 1]
    methods = {r["method"] for r in cells[0]["rows"]}
    assert methods == {"sink+local", "oracle", "mean/dot", "minmax/quest", "hash/hamming", "first/dot",
                       "weighted_mean/dot", "subblock/kvstar_vote"}
    for c in cells:
        for r in c["rows"]:
            assert 0.0 <= r["recall"] <= 1.0 + 1e-5
            if r["method"] == "oracle":
                assert r["relative"] == pytest.approx(1.0)
    # accuracy: dense + 3 methods x 2 ratios, for 1 ppl window and 1 passkey prompt
    assert len(acc.cells("ppl")) == 7 and len(acc.cells("passkey")) == 7
    assert {c["method"] for c in acc.cells("passkey")} == {"dense", "mean", "oracle", "streaming"}
    for c in acc.cells("ppl"):
        assert c["ppl"] > 1.0 and 0 < c["density"] <= 1.0
    assert len(rt.cells("runtime_passkey")) == 3  # dense + esa x 2 ratios
    # reports render from the files
    text = render_quality_tables(recall, acc)
    assert "Attention-mass recall" in text and "| dense |" in text
    assert len(recall_summary(recall)) > 0 and len(accuracy_summary(acc)) == 7
    assert layer_table(recall, block_size=32, selection="per_head", budget="ratio=0.1")[0]["layer"] == 0
    grid = passkey_grid(acc, method="dense", ratio=1.0)
    assert grid["lengths"] == [512] and grid["depths"] == [0.5]
    info = detect_rollback_layers(recall, block_size=32, selection="per_head")
    assert set(info["oracle"]) == {0, 1} and info["threshold"] == 0.5
    # resume: a second run computes nothing and leaves the results unchanged
    before = json.loads((out / "accuracy.json").read_text())["cells"]
    assert run_eval_command(_args("--quick", "--out", str(out), "--no-progress", "--part", "accuracy"), **kw) == 0
    assert json.loads((out / "accuracy.json").read_text())["cells"] == before


def test_result_store_roundtrip_and_errors(tmp_path):
    path = tmp_path / "r.json"
    st = ResultStore(path, meta={"a": 1})
    st.put("ppl", {"method": "mean", "ratio": 0.1}, {"nll": 2.5})
    again = ResultStore(path)
    assert cell_key("ppl", {"ratio": 0.1, "method": "mean"}) in again
    assert again.meta == {"a": 1} and again.cells("ppl")[0]["nll"] == 2.5
    with pytest.raises(ValueError, match="NaN|Out of range"):
        st.put("ppl", {"method": "x"}, {"nll": float("nan")})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ResultStore(path)
    path.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="schema"):
        ResultStore(path)
    with pytest.raises(TypeError, match="cell parameters"):
        cell_key("x", {"a": object()})


def test_block_budget_counts():
    import torch

    nb = torch.tensor([10, 40, 2])
    frac = BlockBudget(kind="fraction", value=0.25)
    assert budget_total_blocks(frac, nb, 16).tolist() == [3, 10, 1]  # round(2.5) = 3 (half up)
    assert candidate_counts(frac, nb, 16, sink_blocks=1, local_blocks=2).tolist() == [0, 7, 0]
    tok = BlockBudget(kind="tokens", value=256)
    assert candidate_counts(tok, nb, 32, sink_blocks=1, local_blocks=2).tolist() == [5, 5, 0]
    assert frac.label == "25%" and tok.label == "256 tok"
    with pytest.raises(ValueError, match="BlockBudget.value"):
        BlockBudget(kind="fraction", value=1.5)
    with pytest.raises(ValueError, match="BlockBudget.kind"):
        BlockBudget(kind="blocks", value=3)


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (RecallSweepConfig, {"block_sizes": (24,)}, "powers of two"),
        (RecallSweepConfig, {"num_queries": 4064, "num_tokens": 4096}, "num_queries"),
        (RecallSweepConfig, {"selections": ("both",)}, "selections"),
        (RecallSweepConfig, {"ratios": (0.0,)}, "ratios"),
        (RecallSweepConfig, {"essay_samples": 0, "passkey_samples": 0}, "essay_samples"),
        (AccuracyConfig, {"chunk": 64, "block_size": 32}, "chunk"),
        (AccuracyConfig, {"methods": ("dense",)}, "methods"),
        (AccuracyConfig, {"passkey_depths": (1.5,)}, "passkey_depths"),
        (RuntimePasskeyConfig, {"algorithms": ("blend",)}, "algorithms"),
    ],
)
def test_configs_reject_bad_values(factory, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory(**kwargs)


def test_eval_cli_rejects_bad_arguments(capsys):
    from ucm_trt.cli import main

    assert main(["eval", "--threads", "0", "--part", "recall"]) == 2
    assert "--threads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ratios", "a,b"])
    assert e.value.code == 2
