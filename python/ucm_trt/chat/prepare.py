"""Export a Hugging Face model to ONNX and rewrite it for the runtime's ONNX Runtime backend, once.

The same two steps as ``ucm-trt export`` and ``ucm-trt rewrite``, with the results kept in a
directory and reused: the chat app's default backend and the passkey demo call it.
"""

from __future__ import annotations

import time
from pathlib import Path

from ucm_trt.chat._names import CHAT_ALGORITHMS

__all__ = ["DEFAULT_ONNX_CACHE", "prepare_onnx"]

#: where ``ucm-trt chat`` keeps the exported and rewritten SmolLM2 (about 1.3 GB)
DEFAULT_ONNX_CACHE = Path("~/.cache/ucm-trt/onnx")


def prepare_onnx(out_dir: str | Path, *, algorithm: str = "esa", block_size: int = 64,
                 checkpoint: str | Path | None = None, progress=None) -> Path:
    """Export a model to ONNX and rewrite it for ``algorithm`` (``ucm-trt export`` + ``ucm-trt rewrite``).

    ``checkpoint`` is a Hugging Face checkpoint directory; default SmolLM2-135M-Instruct (NAME =
    ``smollm2``, else the directory's name). Files in ``out_dir``: ``NAME.onnx`` (the export, about
    650 MB for SmolLM2) and ``NAME-{algorithm}-bs{block_size}.onnx`` (the rewritten model, returned). Each is written
    under a temporary name and renamed when complete, so an existing file is a finished one and
    is reused (the rewritten one only if its metadata names the same algorithm and block size).
    About 1.5 min for the export and 1 min for the rewrite on two CPU cores.
    """
    if algorithm not in CHAT_ALGORITHMS or algorithm == "rerope":
        raise ValueError(f"algorithm must be one of {', '.join(a for a in CHAT_ALGORITHMS if a != 'rerope')}; "
                         f"got {algorithm!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size!r}")
    if not isinstance(out_dir, (str, Path)) or not str(out_dir):
        raise TypeError(f"out_dir must be a directory path, got {out_dir!r}")
    import onnx

    from ucm_trt.graph.driver import RewriteConfig, rewrite_model, save_model
    from ucm_trt.graph.export import export_hf_model
    from ucm_trt.models import smollm2_checkpoint_dir

    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise ValueError(f"checkpoint must be a Hugging Face checkpoint directory, got {checkpoint!r}")
    say = progress if progress is not None else (lambda msg: None)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    name = "smollm2" if checkpoint is None else Path(checkpoint).name
    exported = out / f"{name}.onnx"
    if not exported.is_file():
        src = smollm2_checkpoint_dir() if checkpoint is None else Path(checkpoint)
        tmp = out / f".{name}.onnx.tmp-{time.time_ns()}.onnx"
        t0 = time.perf_counter()
        say(f"[prepare] exporting {src} to {exported} (about 1.5 min for SmolLM2) ...")
        try:
            export_hf_model(src, tmp, progress=say)
            tmp.rename(exported)
        finally:
            tmp.unlink(missing_ok=True)
        say(f"[prepare] exported in {time.perf_counter() - t0:.0f} s")
    rewritten = out / f"{name}-{algorithm}-bs{block_size}.onnx"
    if rewritten.is_file():
        meta = {p.key: p.value for p in onnx.load(str(rewritten), load_external_data=False).metadata_props}
        # a model rewritten before the query-window output (no ucm.query_window) is rewritten again
        if (meta.get("ucm.algorithm") == algorithm and meta.get("ucm.block_size") == str(block_size)
                and meta.get("ucm.query_window") == str(RewriteConfig().query_window)):
            return rewritten
    tmp = out / f".{rewritten.name}.tmp-{time.time_ns()}.onnx"
    t0 = time.perf_counter()
    say(f"[prepare] rewriting {exported.name} for {algorithm}, block size {block_size} (about 1 min) ...")
    try:
        model, report = rewrite_model(exported, config=RewriteConfig(algorithm=algorithm, block_size=block_size))
        save_model(model, tmp)
        tmp.rename(rewritten)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"[prepare] rewrote in {time.perf_counter() - t0:.0f} s: {report.summary().splitlines()[0]}")
    return rewritten
