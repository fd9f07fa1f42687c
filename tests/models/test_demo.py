"""`python -m ucm_trt.demo` end to end at a small size (the full-size run is `make demo`)."""

from __future__ import annotations

import re

import pytest

from ucm_trt import demo


def test_demo_runs_and_reports_every_layer(capsys):
    argv = [
        "--tokens",
        "512",
        "--queries",
        "4",
        "--block-size",
        "32",
        "--ratios",
        "0.25",
        "--sparse-methods",
        "oracle",
        "--no-runtime",  # step 6 (export + rewrite + ONNX Runtime passkey) is tested in tests/samples
    ]
    rc = demo.main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    assert "-> correct" in out, out
    for step in range(1, 6):
        assert f"[{step}/5]" in out
    # one row per layer in the per-layer table: "<layer> <sink+local> <oracle> <6 relative recalls>"
    rows = re.findall(r"^ *(\d+) +([01]\.\d{3}) +([01]\.\d{3}) +((?:\d\.\d{3} *){6})", out, flags=re.M)
    assert [int(r[0]) for r in rows] == list(range(30))
    for _, base, oracle, _rel in rows:
        assert float(base) <= float(oracle) + 1e-3  # the oracle adds blocks to sink+local, never loses mass
    assert "Diffuse layers" in out and "Full recall table, layer 15" in out
    # the oracle selection keeps the needle's blocks, so sparse attention still finds the key
    assert re.search(r"^ +oracle +\(upper bound\) +answer '.*' +-> correct ", out, flags=re.M), out


@pytest.mark.parametrize(
    "argv",
    [
        ["--tokens", "100"],
        ["--block-size", "48"],
        ["--block-size", "8"],
        ["--ratios", "0"],
        ["--queries", "0"],
        ["--diffuse-below", "2"],
    ],
)
def test_demo_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert "must" in capsys.readouterr().err
