"""Triton -> PTX for TensorRT's AOT plugin launcher (no GPU and no TensorRT needed).

TensorRT launches an ``aot_impl`` kernel with exactly these arguments, in this order
(shared/reference/tensorrt.md §2.1)::

    [input pointers ...] [int32 extra scalars ...] [output pointers ...]

Triton >= 3.3 appends a hidden ``global_scratch`` pointer to every kernel's ``.entry`` and
Triton >= 3.5 a ``profile_scratch`` pointer. TensorRT does not pass them, so the compiled PTX's
parameter list is cut back to the kernel's own parameters -- only when both scratch sizes are
zero and the body never reads a dropped parameter; otherwise we refuse (the kernel would need
memory the AOT launcher cannot give it). The PTX ISA version is capped so that the installed
driver can JIT it (a newer ISA fails with CUDA_ERROR_UNSUPPORTED_PTX_VERSION at engine load).

Compilation runs on any machine: ``triton.compile(ASTSource, target=GPUTarget("cuda", cc, 32))``
needs only Triton's bundled LLVM and ptxas, not a GPU.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "PtxTarget",
    "PtxKernel",
    "compile_ptx",
    "entry_params",
    "strip_scratch_params",
    "ptx_isa_for_cuda",
    "driver_cuda_version",
    "MIN_PTX_ISA",
]

# Lowest PTX ISA that can target an architecture (PTX ISA docs: sm_80 since 7.0, sm_86 7.1,
# sm_89 7.8, sm_90/sm_90a 8.0, sm_100 8.6, sm_120 8.7).
MIN_PTX_ISA: Mapping[int, int] = {80: 70, 86: 71, 87: 74, 89: 78, 90: 80, 100: 86, 120: 87}

_SCALAR_PARAM = {"i32": ".u32", "u32": ".u32", "i1": ".u8"}


def ptx_isa_for_cuda(major: int, minor: int) -> int:
    """Highest PTX ISA (as ``10 * major + minor``, e.g. 85 = 8.5) a CUDA ``major.minor`` driver accepts.

    CUDA 11.x -> 7.x, 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5, 12.8 -> 8.7, 12.9 -> 8.8 (CUDA 12.7 was
    never released, so ISA numbers lag one behind from 12.6 on), 13.x -> 9.x.
    """
    for name, v in (("major", major), ("minor", minor)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"CUDA {name} version must be a non-negative int, got {v!r}")
    if major == 11:
        return 70 + minor
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    if major >= 13:
        return 90 + 10 * (major - 13) + minor
    raise ValueError(f"CUDA {major}.{minor} is too old: TensorRT >= 10.9 plugins need CUDA >= 11.0")


def driver_cuda_version() -> tuple[int, int] | None:
    """CUDA version of the installed driver (``cuDriverGetVersion``), or None when there is no driver."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
        return v.value // 1000, (v.value % 1000) // 10
    return None


@dataclass(frozen=True, kw_only=True)
class PtxTarget:
    """Where the PTX will run.

    arch:         compute capability as an int (80 = sm_80, 90 = sm_90a as Triton emits it).
    ptx_version:  PTX ISA cap as ``10 * major + minor`` (e.g. 85); None = the driver's maximum when a
                  driver is installed, else Triton's default (that of its bundled ptxas).
    """

    arch: int
    ptx_version: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.arch, bool) or not isinstance(self.arch, int) or self.arch < 80:
            raise ValueError(f"PtxTarget.arch must be an int compute capability >= 80, got {self.arch!r}")
        if self.ptx_version is not None:
            if isinstance(self.ptx_version, bool) or not isinstance(self.ptx_version, int):
                raise TypeError(f"PtxTarget.ptx_version must be an int like 85 (= PTX 8.5), got {self.ptx_version!r}")
            floor = _min_isa(self.arch)
            if self.ptx_version < floor:
                raise ValueError(
                    f"PtxTarget.ptx_version {self.ptx_version} is below PTX {floor // 10}.{floor % 10}, "
                    f"the lowest ISA that can target sm_{self.arch}"
                )

    @classmethod
    def for_device(cls, arch: int) -> PtxTarget:
        """Target ``arch`` with the ISA capped at what both the installed driver and Triton's
        bundled ptxas accept (Triton assembles the PTX once to get its resource usage)."""
        caps = [c for c in (_driver_isa(), _triton_default_isa(arch)) if c is not None]
        return cls(arch=arch, ptx_version=min(caps) if caps else None)


def _driver_isa() -> int | None:
    drv = driver_cuda_version()
    return None if drv is None else ptx_isa_for_cuda(*drv)


def _triton_default_isa(arch: int) -> int | None:
    """The PTX ISA Triton emits by default for ``arch`` (that of its bundled ptxas), if it can be read."""
    try:
        from triton.backends.nvidia import compiler as nv

        try:
            ptxas = nv.get_ptxas(arch)
        except TypeError:  # older Triton: get_ptxas() takes no argument
            ptxas = nv.get_ptxas()
        return int(nv.ptx_get_version(ptxas.version))
    except Exception:
        return None


def _min_isa(arch: int) -> int:
    best = 70
    for a, v in sorted(MIN_PTX_ISA.items()):
        if arch >= a:
            best = v
    return best


@dataclass(frozen=True, kw_only=True)
class PtxKernel:
    """A compiled kernel ready for TensorRT's AOT launcher."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    param_types: tuple[str, ...]
    ptx_version: str
    metadata: Mapping[str, object] = field(default_factory=dict, repr=False)

    @property
    def block_x(self) -> int:
        return self.num_warps * 32


_ENTRY_RE = r"\.visible\s+\.entry\s+{name}\s*\("


def _entry_span(ptx: str, name: str) -> tuple[int, int]:
    m = re.search(_ENTRY_RE.format(name=re.escape(name)), ptx)
    if m is None:
        raise ValueError(f"PTX has no `.visible .entry {name}(` declaration")
    close = ptx.find(")", m.end())
    if close < 0:
        raise ValueError(f"PTX entry {name} has an unterminated parameter list")
    return m.end(), close


def entry_params(ptx: str, name: str) -> list[tuple[str, str]]:
    """``[(declaration, param_name), ...]`` of the ``.entry name(...)`` parameter list, in order.

    ``declaration`` is the state space and type part, e.g. ``.param .u64 .ptr .global .align 1``
    or ``.param .u32``.
    """
    start, end = _entry_span(ptx, name)
    body = ptx[start:end].strip()
    if not body:
        return []
    out = []
    for raw in body.split(","):
        decl = " ".join(raw.split())
        if not decl.startswith(".param"):
            raise ValueError(f"unexpected PTX parameter declaration in entry {name}: {decl!r}")
        head, _, pname = decl.rpartition(" ")
        out.append((head, pname))
    return out


def strip_scratch_params(
    ptx: str, name: str, n_params: int, *, global_scratch_size: int, profile_scratch_size: int
) -> str:
    """Cut the ``.entry name`` parameter list back to its first ``n_params`` parameters.

    Refuses (ValueError) when a scratch size is non-zero, when fewer than ``n_params`` parameters
    exist, when a dropped parameter is not a pointer, or when the body reads a dropped parameter.
    """
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 0:
        raise ValueError(f"n_params must be a non-negative int, got {n_params!r}")
    for label, size in (("global_scratch_size", global_scratch_size), ("profile_scratch_size", profile_scratch_size)):
        if size:
            raise ValueError(
                f"kernel {name} needs {label} = {size} bytes of Triton scratch memory; TensorRT's AOT "
                "launcher passes no scratch buffer, so this kernel cannot be used with aot_impl "
                "(use the JIT impl, or change the kernel so Triton needs no scratch)"
            )
    params = entry_params(ptx, name)
    if len(params) < n_params:
        raise ValueError(f"entry {name} has {len(params)} parameters, fewer than the kernel's {n_params}")
    dropped = params[n_params:]
    for decl, pname in dropped:
        if ".u64" not in decl:
            raise ValueError(f"entry {name}: trailing parameter {pname} ({decl}) is not a scratch pointer")
        if re.search(rf"\[{re.escape(pname)}(\+\d+)?\]", ptx):
            raise ValueError(f"entry {name}: the kernel body reads trailing parameter {pname}; refusing to strip it")
    if not dropped:
        return ptx
    start, end = _entry_span(ptx, name)
    kept = ",\n".join(f"\t{decl} {pname}" for decl, pname in params[:n_params])
    return ptx[:start] + "\n" + kept + "\n" + ptx[end:]


def _jit_function(kernel):
    """A ``triton.runtime.JITFunction`` for ``kernel``, also when TRITON_INTERPRET=1 wrapped it."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None or not callable(fn):
        raise TypeError(f"kernel must be a @triton.jit function, got {type(kernel).__name__}")
    return JITFunction(fn)


def _compile_in_process(module: str, qualname: str, signature: dict, constexprs: dict, arch: int,
                        options: dict, aligned: list | None = None) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    fn = _jit_function(obj)
    # ``aligned``: parameters the kernel may assume divisible by 16 (Triton's own JIT hint, which
    # lets it vectorise loads); an AOT compile has no arguments to infer it from
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (aligned or [])}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    md = ck.metadata
    return {
        "name": md.name,
        "ptx": ck.asm["ptx"],
        "num_warps": int(md.num_warps),
        "shared": int(md.shared),
        "global_scratch_size": int(getattr(md, "global_scratch_size", 0) or 0),
        "profile_scratch_size": int(getattr(md, "profile_scratch_size", 0) or 0),
    }


def _compile_in_child(request: dict) -> dict:
    """Compile in a fresh interpreter without TRITON_INTERPRET.

    With TRITON_INTERPRET=1 (the CPU test tier) Triton replaces every ``@triton.jit`` function --
    its own standard library included -- by an interpreted one for the whole process, and its code
    generator cannot compile them; the child process imports Triton in compile mode instead.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run([sys.executable, "-m", "trt_plugins.ptx"], input=json.dumps(request), env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"Triton -> PTX compilation of {request['qualname']} failed:\n{tail}")
    return json.loads(proc.stdout)


def compile_ptx(
    kernel,
    *,
    signature: Mapping[str, str],
    constexprs: Mapping[str, object],
    target: PtxTarget,
    num_warps: int = 4,
    num_stages: int = 2,
    divisible_by_16: tuple[str, ...] = (),
) -> PtxKernel:
    """Compile ``kernel`` to PTX for ``target`` and strip Triton's trailing scratch parameters.

    ``signature`` maps every non-constexpr parameter, in declaration order, to its Triton type
    (``*fp16``, ``*i32``, ``i32``, ...); ``constexprs`` gives every ``tl.constexpr`` parameter.
    The result's ``.entry`` parameter list holds exactly the ``signature`` parameters.
    ``divisible_by_16`` names signature parameters (pointers, int32 strides) the launcher guarantees
    to be multiples of 16 (bytes for pointers): Triton's JIT infers this hint from the arguments.
    """
    if not isinstance(target, PtxTarget):
        raise TypeError(f"target must be a PtxTarget, got {type(target).__name__}")
    fn = _jit_function(kernel)
    names = list(fn.arg_names)
    runtime = [n for n in names if n not in constexprs]
    if list(signature) != runtime:
        raise ValueError(
            f"signature of {fn.__name__} must list the non-constexpr parameters in declaration order "
            f"{runtime}, got {list(signature)}"
        )
    missing = [n for n in constexprs if n not in names]
    if missing:
        raise ValueError(f"constexprs {missing} are not parameters of {fn.__name__} ({names})")
    for n, ty in signature.items():
        if not ty.startswith("*") and ty not in _SCALAR_PARAM:
            raise ValueError(f"parameter {n}: type {ty!r} is not a pointer or an int32 scalar (TensorRT passes int32 only)")
    unknown = [n for n in divisible_by_16 if n not in signature]
    if unknown:
        raise ValueError(f"divisible_by_16 names {unknown}, which are not signature parameters of {fn.__name__}")
    full_sig = {n: (signature[n] if n in signature else "constexpr") for n in names}
    options: dict[str, object] = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    if target.ptx_version is not None:
        options["ptx_version"] = target.ptx_version
    from triton import knobs

    raw = fn.fn
    request = {"module": raw.__module__, "qualname": raw.__qualname__, "signature": full_sig,
               "constexprs": dict(constexprs), "arch": target.arch, "options": options,
               "aligned": list(divisible_by_16)}  # fmt: skip
    if knobs.runtime.interpret:
        res = _compile_in_child(request)
    else:
        res = _compile_in_process(**request)
    name = res["name"]
    ptx = strip_scratch_params(
        res["ptx"], name, len(signature),
        global_scratch_size=res["global_scratch_size"], profile_scratch_size=res["profile_scratch_size"],
    )  # fmt: skip
    version = re.search(r"^\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE)
    return PtxKernel(
        name=name,
        ptx=ptx,
        num_warps=res["num_warps"],
        shared_mem=res["shared"],
        param_types=tuple(decl for decl, _ in entry_params(ptx, name)),
        ptx_version=version.group(1) if version else "?",
        metadata={k: v for k, v in res.items() if k != "ptx"},
    )


def _main() -> None:
    """``python -m trt_plugins.ptx``: compile the JSON request on stdin, print the result as JSON."""
    import json
    import sys

    req = json.load(sys.stdin)
    json.dump(_compile_in_process(**req), sys.stdout)


if __name__ == "__main__":
    _main()
