"""Files: atomic writes, and SAEs in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``).

Every file is written to a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from saejax.config import SAEConfig
from saejax.errors import ConfigError, check


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_jsonable(x):
    """Plain Python for ``json``: numpy scalars/arrays to numbers/lists, NaN to None."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_npz(path: str | Path, **arrays) -> Path:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write(path, buf.getvalue())


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- SAELens layout
_ARCH_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}


def save_saelens(directory: str | Path, cfg: SAEConfig, params: dict, *, threshold: float | None = None,
                 metadata: dict | None = None) -> Path:
    """Write one SAE (parameters in raw activation units, no leading seed axis) for SAELens.

    BatchTopK is exported the way SAELens runs it at inference: as a JumpReLU whose threshold is
    the one estimated during training, the same for every latent.
    """
    from safetensors.numpy import save

    directory = Path(directory)
    tensors = {k: np.ascontiguousarray(np.asarray(params[k], np.float32)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.arch == "jumprelu":
        tensors["threshold"] = np.exp(np.asarray(params["log_threshold"], np.float32))
    if cfg.arch == "batchtopk":
        tensors["threshold"] = np.full(cfg.d_sae, threshold if threshold is not None else 0.0, np.float32)
    sae_cfg = {"architecture": _ARCH_TO_SAELENS[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.d_sae,
               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "saejax_arch": cfg.arch, "metadata": metadata or {}}
    if cfg.arch == "topk":
        sae_cfg["k"] = cfg.k
    atomic_write(directory / "sae_weights.safetensors", save(tensors))
    write_json(directory / "cfg.json", sae_cfg)
    return directory


def load_saelens(directory: str | Path) -> tuple[SAEConfig, dict]:
    """Read an SAE in the SAELens layout (ours, or a pretrained one from a local directory).

    Returns a config and parameters in saejax's layout (``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_in]``); a JumpReLU ``threshold`` becomes ``log_threshold``.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    check((directory / "cfg.json").is_file(), f"{str(directory)!r} is not an SAELens directory: no cfg.json")
    weights = directory / "sae_weights.safetensors"
    check(weights.is_file(), f"{str(directory)!r} has no sae_weights.safetensors")
    raw = read_json(directory / "cfg.json")
    t = load_file(str(weights))
    arch = raw.get("saejax_arch") or {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                                       "gated": None}.get(raw.get("architecture", "standard"))
    if arch is None:
        raise ConfigError(f"SAELens architecture {raw.get('architecture')!r} is not supported; expected standard, topk or jumprelu")
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    w_enc, w_dec = t["W_enc"], t["W_dec"]
    check(w_enc.shape == (d_in, d_sae) and w_dec.shape == (d_sae, d_in),
          f"{directory}: W_enc {w_enc.shape} / W_dec {w_dec.shape} do not match d_in={d_in}, d_sae={d_sae}")
    params = {"W_enc": w_enc, "b_enc": t["b_enc"], "W_dec": w_dec, "b_dec": t["b_dec"]}
    if arch == "batchtopk":  # saved by us as a JumpReLU with the inference threshold
        arch = "jumprelu"
    if arch == "jumprelu":
        params["log_threshold"] = np.log(np.maximum(t["threshold"], 1e-30)).astype(np.float32)
    norms = np.linalg.norm(w_dec, axis=1)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=int(raw.get("k", 1 if arch != "topk" else 32)),
                    unit_norm_decoder=bool(np.allclose(norms, 1.0, atol=1e-3)), normalize_input=False)
    return cfg, params
