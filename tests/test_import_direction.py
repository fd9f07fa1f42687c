"""The dependency direction of the package, checked by parsing every module's imports with ``ast``.

    base (config, limits, algorithms, cli_args, testing, _validation)
      -> kernels | models | reference -> sparse -> graph -> trt_plugins -> runtime
      -> apps (chat, eval, bench, demo, cli)

A module may import its own layer and the layers below it, never one above (imports inside
functions and under ``TYPE_CHECKING`` count too). Besides: the test oracle ``ucm_trt.reference``
imports only the base and is imported by no production layer (tests and the quality eval measure
against it); ``trt_plugins`` imports no private ``ucm_trt`` module (``ucm_trt._x``, ``ucm_trt.x._y``).
See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ucm_trt": ROOT / "python" / "ucm_trt", "trt_plugins": ROOT / "trt_plugins"}

#: rank of each layer: a module may import ranks <= its own
LAYERS: dict[str, int] = {
    "_validation": 0, "config": 0, "limits": 0, "algorithms": 0, "cli_args": 0, "testing": 0, "ucm_trt": 0,
    "kernels": 1, "models": 1, "reference": 1,
    "sparse": 2,
    "graph": 3,
    "trt_plugins": 4,
    "runtime": 5,
    "chat": 6, "eval": 6, "bench": 6, "demo": 6, "cli": 6,
}  # fmt: skip
#: who may import the test oracle (besides tests/): the quality eval, which measures against it
ORACLE_READERS = {"reference", "eval"}


def _module_name(pkg: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[pkg]).with_suffix("")
    parts = [pkg, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(pkg: str, path: Path) -> list[tuple[int, str]]:
    """``(line, fully qualified name)`` of every import in the file; ``from a import b`` yields
    ``a.b`` (b may be a module or a name in a: both count as a use of ``a``'s layer and below)."""
    name = _module_name(pkg, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def _layer(qualified: str) -> str | None:
    parts = qualified.split(".")
    if parts[0] == "trt_plugins":
        return "trt_plugins"
    if parts[0] != "ucm_trt":
        return None
    if len(parts) == 1:
        return "ucm_trt"
    return parts[1] if parts[1] in LAYERS else "ucm_trt"  # `from ucm_trt import __version__`


def _all_modules():
    for pkg, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            yield pkg, path


def _violations(modules=None) -> list[str]:
    found = []
    for pkg, path in _all_modules() if modules is None else modules:
        me = _layer(_module_name(pkg, path))
        assert me in LAYERS, f"{path}: layer {me!r} has no rank in LAYERS; add it"
        for line, target in _imports(pkg, path):
            other = _layer(target)
            if other is None or other == me:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if LAYERS[other] > LAYERS[me]:
                found.append(f"{where}: upward ({me}, rank {LAYERS[me]} -> {other}, rank {LAYERS[other]})")
            if other == "reference" and me not in ORACLE_READERS:
                found.append(f"{where}: production code imports the test oracle ucm_trt.reference")
            if me == "reference" and LAYERS[other] > 0:
                found.append(f"{where}: the oracle must stay independent (it imports only the base)")
            private = any(p.startswith("_") and not p.startswith("__") for p in target.split(".")[1:])
            if pkg == "trt_plugins" and target.startswith("ucm_trt") and private:
                found.append(f"{where}: trt_plugins imports a private ucm_trt module")
    return found


def test_every_import_points_down():
    assert _violations() == []


def test_every_layer_is_ranked():
    tops = {_layer(_module_name(pkg, p)) for pkg, p in _all_modules()}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))


@pytest.mark.parametrize(("source", "layer_path", "needle"), [
    ("from ucm_trt.runtime.kv import KVManager\n", "python/ucm_trt/kernels/_probe_up.py", "upward"),
    ("def f():\n    from ucm_trt import reference\n", "python/ucm_trt/runtime/_probe_oracle.py", "test oracle"),
    ("from ucm_trt._validation import check_tensor\n", "trt_plugins/_probe_private.py", "private ucm_trt"),
    ("from ..sparse import select\n", "python/ucm_trt/kernels/_probe_rel.py", "upward"),
])  # fmt: skip
def test_the_check_fails_on_a_planted_violation(source, layer_path, needle):
    """A module planted with an upward / oracle / private import is reported (so the test can fail)."""
    probe = ROOT / layer_path
    assert not probe.exists()
    probe.write_text(source)
    try:
        found = _violations([("trt_plugins" if layer_path.startswith("trt_plugins") else "ucm_trt", probe)])
    finally:
        probe.unlink()
    assert any(probe.name in v and needle in v for v in found), found
