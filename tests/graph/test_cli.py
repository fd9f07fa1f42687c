"""The ``ucm-trt export`` / ``ucm-trt rewrite`` CLI and the builders/ scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.graph._contrib_models import build
from tests.graph._graph_models import make_tiny
from ucm_trt import cli
from ucm_trt.graph.driver import ALGORITHMS

ROOT = Path(__file__).resolve().parents[2]


def test_algorithms_match_driver():
    assert cli.ALGORITHMS == ALGORITHMS


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "export" in out and "rewrite" in out and "pipeline" in out
    with pytest.raises(SystemExit):
        cli.main(["rewrite", "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and "--block-size" in out and "selection.{i}" in out


def test_export_then_rewrite(tmp_path, capsys):
    d = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(d)
    onnx_path = tmp_path / "tiny.onnx"
    assert cli.main(["export", str(d), str(onnx_path), "--exporter", "legacy"]) == 0
    err = capsys.readouterr().err
    assert "exporting with the legacy exporter" in err and "done in" in err
    out_path, rep_path = tmp_path / "tiny-esa.onnx", tmp_path / "report.json"
    rc = cli.main(["rewrite", str(onnx_path), str(out_path), "--algorithm", "esa", "--block-size", "16",
                   "--report-json", str(rep_path)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 attention node(s) rewritten" in out and "decomposed_sdpa=2" in out
    m = onnx.load(str(out_path))
    assert sum(n.op_type == "UcmPagedSparseAttentionSplitK" for n in m.graph.node) == 2
    assert json.loads(rep_path.read_text())["counts"] == {"decomposed_sdpa": 2}
    # ReRoPE through the CLI
    rr = tmp_path / "tiny-rerope.onnx"
    assert cli.main(["rewrite", str(onnx_path), str(rr), "--algorithm", "rerope", "--block-size", "16",
                     "--rerope-window", "64", "--rerope-training-length", "512"]) == 0  # fmt: skip
    assert sum(n.op_type == "UcmPagedReRoPEAttentionSplitK" for n in onnx.load(str(rr)).graph.node) == 2
    # --no-split-scratch: the unsplit ops and no counters input
    plain = tmp_path / "tiny-esa-plain.onnx"
    assert cli.main(["rewrite", str(onnx_path), str(plain), "--algorithm", "esa", "--block-size", "16",
                     "--no-split-scratch"]) == 0  # fmt: skip
    pm = onnx.load(str(plain))
    assert sum(n.op_type == "UcmPagedSparseAttention" for n in pm.graph.node) == 2
    assert not any(n.op_type.endswith("SplitK") for n in pm.graph.node)
    assert "attn_split_counters" not in {i.name for i in pm.graph.input}
    assert "attn_split_counters" in {i.name for i in m.graph.input}


def test_refused_rewrite_exits_1_and_writes_nothing(tmp_path, capsys):
    model, _, _ = build("gqa-fused", attn_attrs={1: {"local_window_size": 4}})
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert cli.main(["rewrite", str(src), str(dst), "--algorithm", "esa", "--block-size", "16"]) == 1
    err = capsys.readouterr().err
    assert "\nucm-trt rewrite: error: 1 attention node(s) cannot be rewritten" in err
    assert "local_window_size=4" in err and not dst.exists()
    assert cli.main(["rewrite", str(src), str(dst), "--algorithm", "esa", "--block-size", "16",
                     "--allow-partial"]) == 0  # fmt: skip
    assert dst.exists() and "[PARTIAL]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["rewrite", "missing.onnx", "o.onnx", "--algorithm", "esa", "--block-size", "16"],
         "IN.onnx 'missing.onnx' does not exist"),
        (["rewrite", "DIR", "o.onnx", "--algorithm", "esa", "--block-size", "16"], "is a directory, not a file"),
        (["rewrite", "EMPTY", "o.onnx", "--algorithm", "esa", "--block-size", "16"], "is empty (0 bytes)"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "esa", "--block-size", "0"],
         "--block-size must be a power of two in [16, 256], got 0"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "esa", "--block-size", "24"],
         "--block-size must be a power of two in [16, 256], got 24"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "esa", "--block-size", "512"],
         "--block-size must be a power of two in [16, 256], got 512"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "rerope", "--block-size", "16"], "needs --rerope-window"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "esa", "--block-size", "16", "--rerope-window", "3"],
         "only apply to --algorithm rerope"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "esa", "--block-size", "16", "--dense-layers", "a"],
         "--dense-layers must be comma-separated"),
        (["rewrite", "IN", "IN", "--algorithm", "esa", "--block-size", "16"], "must differ"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "rerope", "--block-size", "16", "--rerope-window", "9",
          "--rerope-training-length", "4"], "--rerope-window (9) must be <= --rerope-training-length (4)"),
        (["rewrite", "IN", "new/o.onnx", "--algorithm", "esa", "--block-size", "16"],
         "does not exist (create it, or pass --make-dirs)"),
        (["rewrite", "IN", "DIR", "--algorithm", "esa", "--block-size", "16"], "is a directory; give a file path"),
        (["rewrite", "IN", "o.onnx", "--algorithm", "esa", "--block-size", "16", "--report-json", "new/r.json"],
         "--report-json"),
        (["export", "/nonexistent/dir", "o.onnx"], "HF_DIR '/nonexistent/dir' does not exist"),
        (["export", "IN", "o.onnx"], "is a file, not a directory"),
        (["export", "ROOT", "o.onnx"], "has no config.json: not a Hugging Face checkpoint directory"),
        (["export", "DIR", "new/o.onnx"], "OUT.onnx"),
        (["export", "DIR", "o.onnx", "--opset", "23"], "opset must be in [14, 20] for the legacy exporter"),
    ],
)
def test_bad_input_one_line_error_exit_2(tmp_path, capsys, monkeypatch, argv, msg):
    model, _, _ = build("mha")
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text("{}")
    (tmp_path / "empty.onnx").write_bytes(b"")
    names = {"IN": str(src), "DIR": str(tmp_path / "dir"), "EMPTY": str(tmp_path / "empty.onnx"), "ROOT": str(tmp_path)}
    if "missing.onnx" in argv:
        monkeypatch.chdir(tmp_path)
    argv = [names.get(a) or (str(tmp_path / a) if a.endswith((".onnx", ".json")) and a != "missing.onnx" else a)
            for a in argv]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ucm-trt {argv[0]}: error:") and msg in err, err
    assert not (tmp_path / "new").exists()  # nothing created without --make-dirs


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["rewrite", "a.onnx", "b.onnx", "--algorithm", "quest", "--block-size", "4"])
    assert e.value.code == 2 and "invalid choice: 'quest'" in capsys.readouterr().err


def test_builder_script_runs(tmp_path):
    model, _, _ = build("gqa-op")
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    r = subprocess.run([sys.executable, str(ROOT / "builders" / "rewrite_onnx.py"), str(src), str(dst),
                        "--algorithm", "dense", "--block-size", "16"], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert dst.exists() and "ms_group_query_attention=2" in r.stdout


def test_make_dirs_creates_the_output_folder_only_when_asked(tmp_path, capsys):
    model, _, _ = build("mha")
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    dst, rep = tmp_path / "a" / "b" / "out.onnx", tmp_path / "r" / "report.json"
    argv = ["rewrite", str(src), str(dst), "--algorithm", "esa", "--block-size", "16", "--report-json", str(rep)]
    assert cli.main(argv) == 2 and not (tmp_path / "a").exists() and not (tmp_path / "r").exists()
    assert "pass --make-dirs" in capsys.readouterr().err
    assert cli.main([*argv, "--make-dirs"]) == 0
    assert dst.is_file() and json.loads(rep.read_text())["counts"] == {"ms_multi_head_attention": 2}


@pytest.mark.parametrize("head_dim", [8, 24, 272])
def test_head_dim_the_kernels_cannot_run_is_refused_exit_1(tmp_path, capsys, head_dim):
    model, _, _ = build("mha", d=head_dim)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert cli.main(["rewrite", str(src), str(dst), "--algorithm", "esa", "--block-size", "16"]) == 1
    err = capsys.readouterr().err
    assert "ucm-trt rewrite: error: 2 attention node(s) cannot be rewritten" in err
    assert f"head_dim {head_dim} cannot run on the UCM kernels: head_dim must be a multiple of 16 in [16, 256]" in err
    assert not dst.exists()
