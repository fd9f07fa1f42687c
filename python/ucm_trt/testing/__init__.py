"""Test and benchmark helpers shared by tests/ and benchmarks/.

- :mod:`ucm_trt.testing.tolerances`: named fp32/fp16/bf16 tolerances, each with its rationale.
- :mod:`ucm_trt.testing.bench`: GPU timing with CUDA events (:func:`bench_gpu_ms`), and the
  device's copy bandwidth (:func:`copy_bandwidth_tbps`).

Submodules are imported explicitly; this package imports nothing heavy on its own.
"""
