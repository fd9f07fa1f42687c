"""Per-step metrics and their summary (what ``ucm-trt run`` prints as stats).

Per step: kind (prefill / decode), rows, tokens, wall time, blocks and bytes moved host -> device
(delta prefetch) and device -> host (write-back of filled blocks), needed blocks and misses of the
offloaded working sets (hit rate = 1 - misses / needed), device and host KV bytes held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RuntimeMetrics", "StepRecord"]


@dataclass(frozen=True)
class StepRecord:
    kind: str
    rows: int
    tokens: int
    seconds: float
    blocks_loaded: int
    blocks_needed: int
    blocks_written_back: int
    blocks_evicted: int
    bytes_h2d: int
    bytes_d2h: int
    load_seconds: float
    device_kv_bytes: int
    host_kv_bytes: int
    dense_kv_bytes: int  # what the same sequences would hold on the device without offload
    working_set_bytes: int  # blocks this step needed (sink + local + selected + new), all layers
    plan_seconds: float = 0.0  # host time before the forward was launched (policy plan, prefetch, buffers)
    # decode steps, host time of the rest of the step (issue 13's breakdown; seconds - the four = the
    # remainder: deferred-load issue, write-back, query copy start, sampling, emitting):
    forward_seconds: float = 0.0  # the forward's call (eager: its Python and launches; a CUDA graph: the replay)
    sync_seconds: float = 0.0  # the token ids' (or logits') copy to the host: waits for the step's GPU work
    after_step_seconds: float = 0.0  # the policy's after_step (retrieval submission, collection and its waits)
    blocks_prefetched: int = 0  # loaded early for a coming selection (included in blocks_loaded)
    blocks_deferred: int = 0  # overlapped schedule: loaded beside this step for the next (in blocks_loaded)
    stale_layers: int = 0  # (row, layer) pairs that attended their previous selection while new blocks loaded
    sync_switches: int = 0  # (row, layer) pairs that switched synchronously (no resident old set / no room)
    load_gpu_ms: float = 0.0  # GPU time of timed loads that finished by this step's end (RuntimeConfig.time_loads)
    load_wait_ms: float = 0.0  # GPU time the compute stream waited for loads, same accounting
    # host time of the NEXT step's plan, made during this step while its forward ran on the device
    # (RuntimeConfig.plan_ahead; that step's plan_seconds is then 0)
    plan_ahead_seconds: float = 0.0
    # the rest of a decode step's host time, so that the parts add up to ``seconds``:
    launch_seconds: float = 0.0  # before the forward, after the plan: guard checks, input ids upload, upload marks
    enqueue_seconds: float = 0.0  # after the forward's launch: deferred loads, write-backs, query / output copy starts
    emit_seconds: float = 0.0  # after the sync and after_step: sampling, emitting, freeing rows


def _hidden(steps: list[StepRecord]) -> float | None:
    """Fraction of the (timed) GPU load time the compute stream did not wait for: 1 - wait / load."""
    load = sum(s.load_gpu_ms for s in steps)
    if load <= 0:
        return None
    return max(0.0, 1.0 - sum(s.load_wait_ms for s in steps) / load)


class RuntimeMetrics:
    """Collects :class:`StepRecord` s and time-to-first-token per request."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.ttft: dict[str, float] = {}

    def record(self, rec: StepRecord) -> None:
        self.steps.append(rec)

    def summary(self) -> dict[str, Any]:
        dec = [s for s in self.steps if s.kind == "decode"]
        pre = [s for s in self.steps if s.kind == "prefill"]
        dec_tokens = sum(s.tokens for s in dec)
        dec_time = sum(s.seconds for s in dec)
        needed = sum(s.blocks_needed for s in dec)
        loaded = sum(s.blocks_loaded for s in dec)
        out: dict[str, Any] = {
            "prefill_steps": len(pre),
            "prefill_tokens": sum(s.tokens for s in pre),
            "prefill_seconds": sum(s.seconds for s in pre),
            "decode_steps": len(dec),
            "decode_tokens": dec_tokens,
            "decode_seconds": dec_time,
            "decode_tokens_per_s": dec_tokens / dec_time if dec_time > 0 else None,
            "bytes_h2d_total": sum(s.bytes_h2d for s in self.steps),
            "bytes_d2h_total": sum(s.bytes_d2h for s in self.steps),
            "decode_bytes_h2d_per_step": (sum(s.bytes_h2d for s in dec) / len(dec)) if dec else None,
            "decode_bytes_h2d_max_step": max((s.bytes_h2d for s in dec), default=None),
            "cache_hit_rate": (1.0 - loaded / needed) if needed else None,
            "device_kv_bytes_peak": max((s.device_kv_bytes for s in self.steps), default=0),
            "device_kv_bytes_last_decode": dec[-1].device_kv_bytes if dec else None,
            "host_kv_bytes_peak": max((s.host_kv_bytes for s in self.steps), default=0),
            "dense_kv_bytes_last_decode": dec[-1].dense_kv_bytes if dec else None,
            "working_set_bytes_last_decode": dec[-1].working_set_bytes if dec else None,
            "device_kv_over_working_set": (dec[-1].device_kv_bytes / dec[-1].working_set_bytes)
            if dec and dec[-1].working_set_bytes else None,
            "decode_blocks_prefetched": sum(s.blocks_prefetched for s in dec),
            "decode_blocks_deferred": sum(s.blocks_deferred for s in dec),
            "decode_stale_layers": sum(s.stale_layers for s in dec),
            "decode_sync_switches": sum(s.sync_switches for s in dec),
            "load_gpu_ms_total": sum(s.load_gpu_ms for s in self.steps),
            "load_wait_ms_total": sum(s.load_wait_ms for s in self.steps),
            "load_hidden_fraction": _hidden(self.steps),
            "decode_plan_ms_mean": (1e3 * sum(s.plan_seconds for s in dec) / len(dec)) if dec else None,
            "decode_plan_ahead_ms_mean": (1e3 * sum(s.plan_ahead_seconds for s in dec) / len(dec)) if dec else None,
            "decode_launch_ms_mean": (1e3 * sum(s.launch_seconds for s in dec) / len(dec)) if dec else None,
            "decode_enqueue_ms_mean": (1e3 * sum(s.enqueue_seconds for s in dec) / len(dec)) if dec else None,
            "decode_emit_ms_mean": (1e3 * sum(s.emit_seconds for s in dec) / len(dec)) if dec else None,
            "decode_forward_ms_mean": (1e3 * sum(s.forward_seconds for s in dec) / len(dec)) if dec else None,
            "decode_sync_ms_mean": (1e3 * sum(s.sync_seconds for s in dec) / len(dec)) if dec else None,
            "decode_after_step_ms_mean": (1e3 * sum(s.after_step_seconds for s in dec) / len(dec)) if dec else None,
            "ttft_seconds": dict(self.ttft),
        }
        return out
