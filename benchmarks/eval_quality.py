#!/usr/bin/env python
"""Quality benchmark of sparse attention on SmolLM2-135M (issue 7): same options as ``ucm-trt eval``.

    PYTHONPATH=python .venv/bin/python benchmarks/eval_quality.py --part recall
    PYTHONPATH=python .venv/bin/python benchmarks/eval_quality.py --part accuracy
    PYTHONPATH=python .venv/bin/python benchmarks/eval_quality.py --part accuracy \\
        --rollback-from benchmarks/results/quality/recall.json
    PYTHONPATH=python .venv/bin/python benchmarks/plots.py      # PNGs + docs/quality.md tables

Results go to benchmarks/results/quality/*.json; a re-run skips finished cells.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ucm_trt.eval.command import configure_eval_parser, run_eval_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="eval_quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure_eval_parser(parser)
    args = parser.parse_args(argv)
    command = "PYTHONPATH=python .venv/bin/python benchmarks/eval_quality.py " + shlex.join(argv)
    return run_eval_command(args, command=command.strip())


if __name__ == "__main__":
    sys.exit(main())
