#!/usr/bin/env python
"""CPU speed figures (issue 7 "Speed", CPU side): same as ``ucm-trt bench``.

    python benchmarks/bench_cpu.py            # full run -> benchmarks/results/cpu/cpu_bench.json
    python benchmarks/bench_cpu.py --quick    # tiny sizes, < 1 minute

All options: ``ucm-trt bench --help``. Run from the repository root (the default output path is
relative to it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from ucm_trt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
