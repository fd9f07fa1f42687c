#!/usr/bin/env python
"""Build a TensorRT engine from a rewritten (UCM) ONNX model.

Thin wrapper over ``trt_plugins.build.build_engine``; same arguments as ``ucm-trt build``:

    python builders/build_engine.py model-esa.onnx -o model-esa.engine --max-batch 4 --max-blocks 256
"""

import sys

from ucm_trt.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
