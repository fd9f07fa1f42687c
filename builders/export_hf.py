#!/usr/bin/env python
"""Export a Hugging Face decoder directory to ONNX with contiguous KV-cache I/O.

Thin wrapper over ``ucm_trt.graph.export.export_hf_model``; same arguments as ``ucm-trt export``:

    python builders/export_hf.py HF_DIR OUT.onnx [--exporter legacy|dynamo] [--opset N]
"""

import sys

from ucm_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
