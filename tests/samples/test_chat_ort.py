"""The chat app on the runtime's ONNX Runtime backend: a tiny random Llama with SmolLM2's
vocabulary and tokenizer (so the chat template applies), exported with ``ucm_trt.graph.export`` and
rewritten for ESA with 16-token blocks. Its replies are noise; the test checks the plumbing: the
backend named in the stats, sparse selection through the graph's selection inputs, and one-line
errors for algorithms the graph cannot run."""

from __future__ import annotations

import io
import re

import pytest
import torch

from ucm_trt.chat import app


@pytest.fixture(scope="module")
def tiny_rewritten(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ucm_trt.graph.driver import RewriteConfig, rewrite_model, save_model
    from ucm_trt.graph.export import export_hf_model
    from ucm_trt.models import smollm2_checkpoint_dir

    d = tmp_path_factory.mktemp("tiny-smol")
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint_dir(), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    onnx_path = export_hf_model(d, d / "tiny.onnx")
    model, _ = rewrite_model(onnx_path, config=RewriteConfig(algorithm="esa", block_size=16))
    return d, save_model(model, d / "tiny-esa16.onnx")


def test_chat_on_onnx_runtime(tiny_rewritten, doc_file):
    ckpt, onnx_path = tiny_rewritten
    script = "\n".join(["Hello", "/algo esa", f"/load {doc_file}", "Summarize it.", "/algo gsa-on-device",
                        "/algo kvstar", "/algo rerope", "/quit"]) + "\n"
    # --preset ucm: no automatic dense layers (the random tiny model's layers are diffuse: all would run dense)
    args = app.build_parser().parse_args(["--model", str(ckpt), "--onnx", str(onnx_path), "--max-new-tokens", "3",
                                          "--preset", "ucm"])
    out, err = io.StringIO(), io.StringIO()
    assert app.run(args, stdin=io.StringIO(script), stdout=out, stderr=err) == 0, err.getvalue()
    text = out.getvalue()
    stats = [line for line in text.splitlines() if line.startswith("[stats] ")]
    assert len(stats) == 2, text
    assert all(s.startswith("[stats] ort/cpu:onnxruntime (esa graph) | ") for s in stats)
    assert "block_size=16" in text  # taken from the rewritten model
    assert "| dense |" in stats[0] and "blocks/step all" in stats[0]
    m = re.search(r"\| esa@0\.25 \| prompt (\d+) tok.*blocks/step ([\d.]+)/([\d.]+)", stats[1])
    assert m and int(m.group(1)) > 120 and float(m.group(2)) < float(m.group(3)), stats[1]
    errors = err.getvalue().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: ") for e in errors), errors
    assert ("algorithm 'gsa-on-device' cannot be combined with the onnxruntime backend: it selects blocks inside "
            "each layer's attention") in errors[0]
    assert "rerope algorithm needs a model rewritten for ReRoPE" in errors[1] and "'esa'" in errors[1]
    assert "[chat] algorithm -> gsa-on-device" not in text  # the switch was refused; esa stays
    # the rewritten graph returns the last prompt queries KVStar reads (RewriteConfig.query_window): it runs there
    assert "[chat] algorithm -> kvstar" in text


def test_block_size_must_match_the_graph(tiny_rewritten):
    ckpt, onnx_path = tiny_rewritten
    args = app.build_parser().parse_args(["--model", str(ckpt), "--onnx", str(onnx_path), "--block-size", "32"])
    out, err = io.StringIO(), io.StringIO()
    assert app.run(args, stdin=io.StringIO(""), stdout=out, stderr=err) == 2
    line = err.getvalue().strip()
    assert "\n" not in line and line.startswith("ucm-trt chat: error: ")
    assert f"--block-size 32 differs from the block size of --onnx {str(onnx_path)!r} (16)" in line


def test_passkey_side_by_side_on_onnx_runtime(tiny_rewritten):
    from transformers import AutoTokenizer

    from ucm_trt.chat.demo_passkey import ORT_ALGORITHMS, passkey_side_by_side
    from ucm_trt.models import haystack_text

    ckpt, onnx_path = tiny_rewritten
    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    buf = io.StringIO()
    runs = passkey_side_by_side(num_tokens=300, tokenizer=tok, onnx_path=onnx_path, max_new_tokens=3, preset="ucm",
                                haystack=haystack_text(source="filler"), file=buf)
    text = buf.getvalue()
    assert [r.algorithm for r in runs] == list(ORT_ALGORITHMS) == ["dense", "esa", "gsa"]
    assert "backend: ort/cpu:onnxruntime (esa graph)" in text and "block size 16" in text
    for r in runs:  # a random model: the verdict must follow the answer, whatever it is
        assert r.correct == ("68231" in r.answer)
        assert r.stats.backend.startswith("ort/cpu")
    assert runs[0].stats.blocks_selected is None
    for r in runs[1:]:
        assert r.stats.blocks_selected is not None and r.stats.blocks_selected < r.stats.blocks_total
    with pytest.raises(ValueError, match="differs from the ONNX model's block size 16"):
        passkey_side_by_side(num_tokens=300, tokenizer=tok, onnx_path=onnx_path, block_size=32, file=io.StringIO())
    with pytest.raises(ValueError, match="onnx_path must be an existing rewritten .onnx file"):
        passkey_side_by_side(onnx_path=ckpt / "missing.onnx")


@pytest.mark.trt
@pytest.mark.gpu
def test_chat_on_a_tensorrt_engine(tiny_rewritten, tmp_path):
    """TensorRT tier: build an engine from the same rewritten model and chat over it."""
    from ucm_trt import cli

    ckpt, onnx_path = tiny_rewritten
    engine = tmp_path / "tiny-esa16.engine"
    assert cli.main(["build", str(onnx_path), "-o", str(engine), "--max-blocks", "64"]) == 0
    script = "Hello\n/algo esa\nHello again, tell me more about it please.\n/algo gsa-on-device\n/quit\n"
    args = app.build_parser().parse_args(["--model", str(ckpt), "--engine", str(engine), "--max-new-tokens", "3"])
    out, err = io.StringIO(), io.StringIO()
    assert app.run(args, stdin=io.StringIO(script), stdout=out, stderr=err) == 0, err.getvalue()
    stats = [line for line in out.getvalue().splitlines() if line.startswith("[stats] ")]
    assert len(stats) == 2 and all(s.startswith("[stats] trt/cuda:tensorrt") for s in stats), out.getvalue()
    assert "| dense |" in stats[0] and "| esa@0.25 |" in stats[1]
    errors = err.getvalue().splitlines()
    assert len(errors) == 1 and ("algorithm 'gsa-on-device' cannot be combined with the onnxruntime backend: it "
                                 "selects blocks inside each layer's attention") in errors[0]


def test_prepare_onnx_exports_rewrites_and_reuses(tiny_rewritten, tmp_path):
    import onnx

    from ucm_trt.chat.demo_passkey import prepare_onnx

    ckpt, _ = tiny_rewritten
    msgs: list[str] = []
    path = prepare_onnx(tmp_path, checkpoint=ckpt, block_size=16, progress=msgs.append)
    assert path == tmp_path / f"{ckpt.name}-esa-bs16.onnx" and (tmp_path / f"{ckpt.name}.onnx").is_file()
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["ucm.algorithm"] == "esa" and meta["ucm.block_size"] == "16"
    assert any("exporting" in m for m in msgs) and any("rewriting" in m for m in msgs)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # temporaries renamed or removed
    stamp = path.stat().st_mtime_ns
    msgs.clear()
    assert prepare_onnx(tmp_path, checkpoint=ckpt, block_size=16, progress=msgs.append) == path
    assert msgs == [] and path.stat().st_mtime_ns == stamp  # reused, nothing redone
    other = prepare_onnx(tmp_path, checkpoint=ckpt, block_size=32, algorithm="gsa")
    meta = {p.key: p.value for p in onnx.load(str(other), load_external_data=False).metadata_props}
    assert other.name.endswith("-gsa-bs32.onnx") and meta["ucm.block_size"] == "32"
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        prepare_onnx(tmp_path, checkpoint=ckpt, block_size=24)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        prepare_onnx(tmp_path, checkpoint=ckpt, algorithm="rerope")


def test_default_backend_prepares_the_onnx_model(tiny_rewritten, tmp_path):
    """No --onnx: the default (auto) backend exports and rewrites --model into --onnx-cache, then
    runs ONNX Runtime over it; a second start reuses the files."""
    ckpt, _ = tiny_rewritten
    argv = ["--model", str(ckpt), "--onnx-cache", str(tmp_path), "--block-size", "16", "--max-new-tokens", "2"]
    for first in (True, False):
        out, err = io.StringIO(), io.StringIO()
        args = app.build_parser().parse_args(argv)
        assert app.run(args, stdin=io.StringIO("Hello\n"), stdout=out, stderr=err) == 0, err.getvalue()
        text = out.getvalue()
        assert "[chat] ONNX Runtime model:" in text and str(tmp_path) in text
        assert ("exporting" in text) == first and ("rewriting" in text) == first
        assert "[stats] ort/cpu:onnxruntime (esa graph) | dense |" in text
    assert (tmp_path / f"{ckpt.name}-esa-bs16.onnx").is_file()
