#!/usr/bin/env python
"""Rewrite an exported decoder ONNX to UCM paged sparse / ReRoPE attention.

Thin wrapper over ``ucm_trt.graph.rewrite_model``; same arguments as ``ucm-trt rewrite``:

    python builders/rewrite_onnx.py IN.onnx OUT.onnx --algorithm esa --block-size 16
"""

import sys

from ucm_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["rewrite", *sys.argv[1:]]))
