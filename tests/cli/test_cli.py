"""The ``ucm-trt`` command line: top-level help, every subcommand's --help, one-line usage errors
with exit code 2, and the ``chat`` subcommand (argument checks before any model loads, and a
short scripted conversation). The export/rewrite happy paths on tiny models are in
tests/graph/test_cli.py; ``run``/``build``/``bench``/``eval`` get their tests here when they land
in ``ucm_trt.cli.COMMANDS``."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from ucm_trt import cli

NAMES = [c.name for c in cli.COMMANDS]


def _one_line_error(err: str, prefix: str, *, allow_load_progress: bool = False) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    if allow_load_progress:  # transformers' weight-loading progress bar (stderr), printed before the check
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    return lines[0]


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "pipeline:" in out
    flat = " ".join(out.split())
    for cmd in cli.COMMANDS:
        assert cmd.name in out and " ".join(cmd.help.split()[:4]) in flat, (cmd.name, out)
    assert "chat" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ucm-trt {name}")
    assert "example:" in out  # every subcommand's help teaches with examples


@pytest.mark.parametrize(
    "argv, msg",
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["chat", "--budget", "abc"], "argument --budget: invalid float value: 'abc'"),
        (["chat", "--algorithm", "quest"], "argument --algorithm: invalid choice: 'quest'"),
        (["chat", "--algorithm", "blend"], "argument --algorithm: invalid choice: 'blend'"),  # a prefill method
        (["chat", "--backend", "tensorflow"], "argument --backend: invalid choice: 'tensorflow'"),
        (["chat", "--max-new-tokens"], "argument --max-new-tokens: expected one argument"),
        # argparse reports extra arguments from the top-level parser
        (["chat", "stray-positional"], "unrecognized arguments: stray-positional"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    prog = "ucm-trt chat" if argv[:1] == ["chat"] and "stray-positional" not in argv else "ucm-trt"
    line = _one_line_error(capsys.readouterr().err, f"{prog}: error: ")
    assert msg in line and f"(see '{prog} --help')" in line


@pytest.mark.parametrize(
    "argv, code, msg",
    [
        (["--budget", "0"], 2, "--budget must be in (0, 1]"),
        (["--budget", "1.5"], 2, "--budget must be in (0, 1]"),
        (["--block-size", "48"], 2, "--block-size must be a power of two in [16, 256], got 48"),
        (["--block-size", "8"], 2, "--block-size must be a power of two in [16, 256], got 8"),
        (["--load", "DIR"], 2, "is a directory, not a file"),
        (["--load", "LATIN1"], 2, "is not UTF-8 text (byte 0xe9 at offset 3"),
        (["--onnx-cache", "NEWDIR"], 2, "does not exist (create it, or pass --make-dirs)"),
        (["--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1, got 0"),
        (["--temperature", "0.7"], 2, "--temperature 0.7 samples: pass --seed N as well"),
        (["--threads", "0"], 2, "--threads must be >= 1, got 0"),
        (["--max-context", "1"], 2, "--max-context must be >= 2, got 1"),
        (["--device", "tpu"], 2, "--device must be cpu or cuda[:N], got 'tpu'"),
        (["--load", "/nonexistent/essay.txt"], 2, "--load '/nonexistent/essay.txt' does not exist"),
        (["--engine", "/nonexistent/model.plan"], 2, "--engine '/nonexistent/model.plan' does not exist"),
        (["--backend", "torch", "--engine", "PLAN"], 2, "cannot be combined with --backend torch"),
        (["--backend", "trt"], 2, "--backend trt needs --engine PLAN"),
        (["--onnx", "/nonexistent/m.onnx"], 2, "--onnx '/nonexistent/m.onnx' does not exist"),
        (["--onnx", "PLAN", "--engine", "PLAN"], 2, "--engine (TensorRT) and --onnx (ONNX Runtime) exclude each other"),
        (["--onnx", "PLAN", "--device", "cuda"], 2, "ONNX Runtime runs on the CPU; drop --device cuda"),
        (["--backend", "ort", "--device", "cuda"], 2, "ONNX Runtime runs on the CPU; drop --device cuda"),
        (["--dtype", "bfloat16"], 2, "--dtype bfloat16 applies to --backend torch"),
        (["--backend", "torch", "--onnx-cache", "DIR"], 2, "--onnx-cache applies to the ONNX Runtime backend"),
        (["--onnx", "PLAN", "--backend", "torch"], 2, "cannot be combined with --backend torch"),
    ],
)
def test_chat_bad_arguments_fail_fast(argv, code, msg, capsys, tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    names = {"PLAN": str(plan), "DIR": str(tmp_path), "LATIN1": str(tmp_path / "latin1.txt"),
             "NEWDIR": str(tmp_path / "new" / "cache")}
    argv = [names.get(a, a) for a in argv]
    assert cli.main(["chat", *argv]) == code
    assert not (tmp_path / "new").exists()
    captured = capsys.readouterr()
    line = _one_line_error(captured.err, "ucm-trt chat: error: ")
    assert msg in line, line
    assert "loading" not in captured.out  # rejected before the model loads


def test_chat_engine_without_tensorrt_is_one_line(capsys, tmp_path):
    """Exit 1 (the environment lacks TensorRT), one line, before any model loads."""
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except Exception:  # ImportError, or the PyPI stub's RuntimeError
        has_trt = False
    rc = cli.main(["chat", "--engine", str(plan)])
    line = _one_line_error(capsys.readouterr().err, "ucm-trt chat: error: --engine")
    if has_trt:  # a real TensorRT: the engine file (one zero byte, no sidecar) is what fails
        assert rc in (1, 2) and "model.plan" in line
    else:
        assert rc == 1
        assert "--engine needs TensorRT: TensorRT is not available (`import tensorrt` failed" in line
        assert "ucm-trt[trt]" in line


def test_chat_cuda_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-GPU error path cannot be exercised here")
    assert cli.main(["chat", "--backend", "torch", "--device", "cuda"]) == 1
    line = _one_line_error(capsys.readouterr().err, "ucm-trt chat: error: ")
    assert "--device cuda: no CUDA device is available" in line


def test_chat_happy_path_through_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n/algo blend\n/algo esa\n/algo\n"
                                                  "/stats\n/quit\n"))
    assert cli.main(["chat", "--backend", "torch", "--max-new-tokens", "4", "--block-size", "16"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "you> What is the capital of France?" in out
    assert "assistant> The capital of France" in out
    assert "[stats] torch/cpu:torch | dense | prompt " in out
    assert "[chat] algorithm -> esa" in out and "algorithm=esa budget=0.25 block_size=16" in out
    # /algo offers only what a chat turn can run, and refuses blend with the reason in one line
    assert "[chat] algorithm esa; available: dense, esa, gsa, gsa-on-device, kvstar, rerope" in out
    errors = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors) == 1 and "/algo: unknown algorithm 'blend'; choose one of dense," in errors[0], captured.err
    assert "blend is not a chat algorithm: it is a prefill method" in errors[0]
    assert "ucm-trt run --algorithm blend" in errors[0]


def test_console_entry_point_subprocess():
    r = subprocess.run([sys.executable, "-m", "ucm_trt.cli", "chat", "--budget", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "ucm-trt chat: error: --budget must be in (0, 1] (a fraction of blocks), got 0.0"
    r = subprocess.run([sys.executable, "-m", "ucm_trt.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(name in r.stdout for name in NAMES)


# ------------------------------------------------------------------------------ run / build / eval


def test_run_happy_path_json(capsys):
    import json

    rc = cli.main(["run", "--prompt", "The capital of France is", "--max-new-tokens", "3", "--block-size", "16",
                   "--json"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(out)
    assert "Paris" in res["text"]
    st = res["stats"]
    assert st["algorithm"] == "dense" and st["generated_tokens"] == 3 and st["prompt_tokens"] >= 5


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["run"], "one of the arguments --prompt --prompt-file is required"),
        (["run", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["run", "--prompt", "hi", "--block-size", "48"], "--block-size must be a power of two in [16, 256], got 48"),
        (["run", "--prompt-file", "/nonexistent/p.txt"], "--prompt-file '/nonexistent/p.txt' does not exist"),
        (["run", "--prompt", "hi", "--ratio", "2"], "--ratio must be in (0, 1] (the fraction of candidate blocks kept), "
                                                    "got 2.0"),
        (["run", "--prompt", "hi", "--ratio", "-0.5"], "--ratio must be in (0, 1]"),
        (["run", "--prompt", "hi", "--onnx", "/nonexistent/m.onnx"], "--onnx '/nonexistent/m.onnx' does not exist"),
        (["run", "--prompt", " "], "--prompt is empty"),
        (["build"], "the following arguments are required: REWRITTEN.onnx, -o/--output"),
        (["build", "/nonexistent/m.onnx", "-o", "x.engine"], "'/nonexistent/m.onnx' does not exist"),
        (["eval", "--part", "nope"], "argument --part: invalid choice: 'nope'"),
    ],
)
def test_other_subcommands_bad_arguments_exit_2(argv, msg, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse-level errors
        rc = e.code
    assert rc == 2
    # every check runs before the model loads: nothing but the error line on stderr
    line = _one_line_error(capsys.readouterr().err, f"ucm-trt {argv[0]}: error: ")
    assert msg in line, line


def test_build_without_tensorrt_exits_1_with_one_line(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: the missing-TensorRT path cannot be exercised (the trt tier builds)")
    except Exception:  # ImportError, or the PyPI stub's RuntimeError
        pass
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"\0")
    assert cli.main(["build", str(onnx_path), "-o", str(tmp_path / "m.engine")]) == 1
    line = _one_line_error(capsys.readouterr().err, "ucm-trt build: error: ")
    assert "TensorRT is not available" in line and "ucm-trt[trt]" in line


@pytest.mark.parametrize(
    "argv, kind",
    [
        ([], "ort"),
        (["--algorithm", "esa"], "ort"),
        (["--algorithm", "gsa"], "ort"),
        (["--algorithm", "gsa-on-device"], "torch"),  # a rewritten graph cannot select inside a layer
        (["--algorithm", "kvstar"], "ort"),  # the rewritten graph returns the prompt queries KVStar reads
        (["--algorithm", "rerope"], "torch"),  # the ESA-rewritten graph has no ReRoPE attention
        (["--backend", "torch"], "torch"),
        (["--backend", "ort", "--algorithm", "rerope"], "ort"),  # explicit: the session refuses rerope later
        (["--onnx", "PLAN"], "ort"),
    ],
)
def test_chat_auto_backend_choice(argv, kind, tmp_path):
    from ucm_trt.chat import app

    plan = tmp_path / "m.onnx"
    plan.write_bytes(b"\0")
    args = app.build_parser().parse_args([str(plan) if a == "PLAN" else a for a in argv])
    assert app._resolve_backend(args) == kind


def test_chat_refuses_blend_without_a_model():
    """Blend is a runtime algorithm (ALGORITHMS) but not a per-turn policy: the chat's settings,
    /algo parsing and help name only what a turn can run, and say where blend runs."""
    from ucm_trt.chat._names import ALGORITHMS, CHAT_ALGORITHMS
    from ucm_trt.chat.commands import help_text, parse_line
    from ucm_trt.chat.session import ChatError, ChatSettings

    assert "blend" in ALGORITHMS and "blend" not in CHAT_ALGORITHMS
    with pytest.raises(ChatError, match=r"^/algo: unknown algorithm 'blend'; choose one of dense, esa, gsa, "
                                        r"gsa-on-device, kvstar, rerope; blend is not a chat algorithm: .*"
                                        r"ucm-trt run --algorithm blend"):
        parse_line("/algo blend")
    with pytest.raises(ValueError, match=r"^ChatSettings.algorithm must be one of .*; got 'blend'; blend is not a "
                                         r"chat algorithm"):
        ChatSettings(algorithm="blend")
    with pytest.raises(ChatError, match=r"^/algo: unknown algorithm 'quest'; choose one of dense, esa, gsa, "
                                        r"gsa-on-device, kvstar, rerope$"):
        parse_line("/algo quest")
    assert "blend" not in help_text() and "kvstar, rerope" in help_text()
    with pytest.raises(ValueError, match="algorithms: 'blend' is not one of dense, esa"):
        from ucm_trt.chat.demo_passkey import _check_args

        _check_args(1000, ["dense", "blend"], 0.25, 64, 8, 0.5)


def test_run_help_documents_blend(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--chunk TEXT", "--chunk-file PATH", "--recompute-layer L", "--recompute-ratio R", "--compare-full",
                 "--chunk-pad-token ID", "ucm-trt run --algorithm blend --chunk-file"):
        assert flag in out, flag


def test_run_blend_on_the_ort_backend_is_one_line(capsys):
    assert cli.main(["run", "--algorithm", "blend", "--backend", "ort", "--chunk", "a doc", "--prompt", "q?"]) == 2
    line = _one_line_error(capsys.readouterr().err, "ucm-trt run: error: ")
    assert line.startswith("ucm-trt run: error: --algorithm blend needs --backend torch, got --backend ort"), line


def test_help_imports_nothing_heavy():
    """``ucm-trt --help`` and every ``ucm-trt CMD --help`` build their parsers without importing torch,
    transformers, onnx or triton (issue 17: --help took 2.3 s importing torch; now ~0.1 s)."""
    code = ("import sys; from ucm_trt import cli; p = cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime', 'triton', 'tensorrt') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_bad_flags_are_refused_before_torch_loads(tmp_path):
    """Every command refuses a bad flag before any heavy import (so before any model loads: issue 17
    measured `ucm-trt run --block-size 24` failing only after ~6 s of loading)."""
    prompt = tmp_path / "p.txt"
    prompt.write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "config.json").write_text("{}")  # tmp_path passes as a checkpoint directory
    cases = [
        (["run", "--prompt", "x", "--block-size", "24"], "--block-size must be a power of two in [16, 256], got 24"),
        (["run", "--prompt-file", str(prompt)], "--prompt-file"),
        (["run", "--prompt", "x", "--ratio", "-0.5"], "--ratio must be in (0, 1]"),
        (["rewrite", str(prompt), str(tmp_path / "o.onnx"), "--algorithm", "esa", "--block-size", "24"],
         "--block-size must be a power of two in [16, 256], got 24"),
        (["export", str(tmp_path), str(tmp_path / "no" / "o.onnx")], "OUT.onnx"),
        (["chat", "--block-size", "24"], "--block-size must be a power of two in [16, 256], got 24"),
        (["chat", "--budget", "0"], "--budget must be in (0, 1]"),
        (["eval", "--block-size", "24"], "--block-size must be a power of two in [16, 256], got 24"),
        (["bench", "--out", str(tmp_path / "no" / "b.json")], "--out"),
        (["build", str(tmp_path), "-o", str(tmp_path / "e.engine")], "REWRITTEN.onnx"),
    ]
    lines = [argv for argv, _ in cases]
    code = (f"import sys; from ucm_trt import cli; rcs = [cli.main(a) for a in {lines!r}]; "
            "print(rcs, [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == f"{[2] * len(lines)} []", r.stdout + r.stderr
    errs = r.stderr.strip().splitlines()
    assert len(errs) == len(lines), r.stderr
    for (argv, needle), line in zip(cases, errs, strict=True):
        assert line.startswith(f"ucm-trt {argv[0]}: error: ") and needle in line, line
    assert not (tmp_path / "no").exists()


def test_run_cuda_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-GPU error path cannot be exercised here")
    assert cli.main(["run", "--prompt", "hi", "--device", "cuda"]) == 2
    line = _one_line_error(capsys.readouterr().err, "ucm-trt run: error: ")
    assert "--device cuda: no CUDA device is available" in line


@pytest.mark.parametrize(
    "argv, start",
    [
        (["export", "CKPT", "OUT"], "ucm-trt export: error: HF_DIR "),
        (["rewrite", "GARBAGE", "OUT", "--algorithm", "esa", "--block-size", "16"],
         "ucm-trt rewrite: error: IN.onnx "),
        (["run", "--prompt", "hi", "--model", "CKPT"], "ucm-trt run: error: --model "),
        (["chat", "--model", "CKPT"], "ucm-trt chat: error: --model "),
        (["eval", "--part", "accuracy", "--rollback-from", "GARBAGE", "--out", "DIR"],
         "ucm-trt eval: error: --rollback-from "),
    ],
)
def test_inputs_that_pass_the_checks_but_cannot_be_loaded_name_the_flag(argv, start, tmp_path, capsys):
    """A checkpoint folder transformers cannot load (config.json without model_type, no tokenizer), a
    file that is not ONNX or not a result file: one line naming the flag, exit 2, no traceback."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 neither ONNX nor JSON")
    names = {"CKPT": str(ckpt), "GARBAGE": str(garbage), "OUT": str(tmp_path / "o.onnx"), "DIR": str(tmp_path)}
    assert cli.main([names.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[ucm-trt", "[chat]"))]
    assert len(lines) == 1 and lines[0].startswith(start), err
