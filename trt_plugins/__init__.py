"""TensorRT plugins for ucm-trt (QDP ``tensorrt.plugin`` definitions, one module or folder per op).

This package imports ``tensorrt`` and is imported only by the TensorRT backend and the engine
builders (DESIGN §2). Install the ``trt`` extra (``pip install "ucm-trt[trt]"``) to use it.
"""
