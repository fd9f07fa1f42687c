"""Resumable JSON result files for the evaluation suite.

A result file holds ``{"schema": ..., "meta": {...}, "cells": {key: record}}``. Each *cell* is one
measured unit (for example: one layer x block size x representation x budget of a recall sweep,
or one algorithm x sparsity x sample of a perplexity run). Its key is a canonical string built
from the cell's parameters, so a re-run with the same parameters finds the finished cell and
skips it. The file is rewritten atomically (temporary file + ``os.replace``) after every cell, so
an interrupted run loses at most the cell in progress.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "cell_key", "cpu_model_name", "machine_info", "utc_now"]

SCHEMA = "ucm-trt-quality/1"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _canon(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_canon(v) for v in value) + "]"
    raise TypeError(f"cell parameters must be bool, int, float, str, None or lists of them; got {value!r}")


def cell_key(kind: str, params: Mapping[str, Any]) -> str:
    """Canonical key ``kind|name=value|...`` (parameters sorted by name)."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty str, got {kind!r}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping, got {type(params).__name__}")
    parts = [kind] + [f"{k}={_canon(params[k])}" for k in sorted(params)]
    return "|".join(parts)


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what :mod:`platform` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        tf_version = None
    return {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "platform": platform.platform(),
    }


def _dumps(payload: dict[str, Any]) -> str:
    """JSON with one line per cell: compact, yet a re-run's diff shows which cells changed."""
    head = {k: v for k, v in payload.items() if k != "cells"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True, allow_nan=False)},")
    lines.append(' "cells": {')
    cells = payload["cells"]
    for i, key in enumerate(sorted(cells)):
        sep = "," if i + 1 < len(cells) else ""
        body = json.dumps(cells[key], sort_keys=True, allow_nan=False, separators=(",", ":"))
        lines.append(f"  {json.dumps(key)}: {body}{sep}")
    lines.append(" }")
    lines.append("}")
    return "\n".join(lines) + "\n"


class ResultStore:
    """A JSON file of finished cells; see the module docstring.

    Parameters
    ----------
    path:
        The JSON file. It is created on the first :meth:`put` (its folder too).
    meta:
        Run metadata stored under ``"meta"``. An existing file's metadata is kept, and updated with
        the new values on the first :meth:`put`.
    """

    def __init__(self, path: str | Path, *, meta: Mapping[str, Any] | None = None) -> None:
        if not isinstance(path, (str, Path)) or not str(path):
            raise TypeError(f"path must be a non-empty str or Path, got {path!r}")
        self.path = Path(path)
        self._meta: dict[str, Any] = {}
        self._cells: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"result file {self.path} is not valid JSON ({err}); move it away to start afresh"
                ) from err
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError(
                    f"result file {self.path} has schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                    f"expected {SCHEMA!r}; move it away to start afresh"
                )
            self._meta = dict(data.get("meta", {}))
            self._cells = dict(data.get("cells", {}))
        if meta is not None:
            if not isinstance(meta, Mapping):
                raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
            self._meta.update(meta)

    def __contains__(self, key: str) -> bool:
        return key in self._cells

    def __len__(self) -> int:
        return len(self._cells)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._cells.get(key)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._meta)

    def cells(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Finished records, optionally only those of one kind, in key order."""
        return [
            self._cells[k] for k in sorted(self._cells) if kind is None or k.split("|", 1)[0] == kind
        ]

    def put(self, kind: str, params: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        """Record a finished cell (its parameters, values and finish time) and save the file."""
        key = cell_key(kind, params)
        record = {"kind": kind, **dict(params), **dict(values), "finished_utc": utc_now()}
        self._cells[key] = record
        self.save()
        return record

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"schema": SCHEMA, "meta": self._meta, "cells": self._cells}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(_dumps(payload))
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
