"""Files: atomic writes, and SAEs in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``).

Every file is written to a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, overload

import numpy as np

from saejax import archs
from saejax.config import SAEConfig
from saejax.errors import check


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@overload
def to_jsonable(x: dict) -> dict: ...
@overload
def to_jsonable(x: object) -> Any: ...
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
def save_saelens(directory: str | Path, cfg: SAEConfig, params: dict, *, threshold: float | None = None,
                 metadata: dict | None = None) -> Path:
    """Write one SAE (parameters in raw activation units, no leading seed axis) for SAELens.

    What each architecture adds (a JumpReLU's thresholds; BatchTopK exported the way SAELens runs
    it at inference, as a JumpReLU whose threshold is the one estimated during training) is its
    registry entry's ``to_saelens`` (:mod:`saejax.archs`).
    """
    from safetensors.numpy import save

    arch = archs.get(cfg.arch)
    directory = Path(directory)
    tensors = {k: np.asarray(params[k], np.float32) for k in ("W_enc", "W_dec", "b_dec")}
    tensors[arch.saelens_b_enc] = np.asarray(params["b_enc"], np.float32)
    tensors.update(arch.to_saelens(cfg, params, threshold))
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    sae_cfg = {"architecture": arch.saelens, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "saejax_arch": cfg.arch, "metadata": metadata or {}}
    sae_cfg.update({f: getattr(cfg, f) for f in arch.cfg_fields})
    atomic_write(directory / "sae_weights.safetensors", save(tensors))
    write_json(directory / "cfg.json", sae_cfg)
    return directory


def load_saelens(directory: str | Path) -> tuple[SAEConfig, dict]:
    """Read an SAE in the SAELens layout (ours, or a pretrained one from a local directory).

    Returns a config and parameters in saejax's layout (``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_in]``); a JumpReLU ``threshold`` becomes ``log_threshold``. With
    ``"apply_b_dec_to_input": false`` (Gemma Scope and many pretrained SAEs) SAELens computes
    ``pre = x @ W_enc + b_enc``; that is folded as ``b_enc' = b_enc + b_dec @ W_enc``.
    ``normalize_activations`` other than ``none`` cannot be reproduced from the directory alone.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    check((directory / "cfg.json").is_file(), f"{str(directory)!r} is not an SAELens directory: no cfg.json")
    weights = directory / "sae_weights.safetensors"
    check(weights.is_file(), f"{str(directory)!r} has no sae_weights.safetensors")
    raw = read_json(directory / "cfg.json")
    t = load_file(str(weights))
    name = raw.get("saejax_arch") or archs.SAELENS_NAMES.get(raw.get("architecture", "standard"))
    check(name in archs.REGISTRY, f"{directory}: SAELens architecture {raw.get('architecture')!r} is not supported; "
                                  f"expected one of {sorted(archs.SAELENS_NAMES)}")
    assert isinstance(name, str)  # narrowing only: a registry key
    saved = archs.get(name)
    arch = archs.get(saved.loads_as or saved.name)
    missing = [k for k in ("W_enc", "W_dec", "b_dec", saved.saelens_b_enc) if k not in t]
    check(not missing, f"{directory}: sae_weights.safetensors has no {', '.join(missing)} (found {sorted(t)})")
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    w_enc, w_dec = t["W_enc"], t["W_dec"]
    check(w_enc.shape == (d_in, d_sae) and w_dec.shape == (d_sae, d_in),
          f"{directory}: W_enc {w_enc.shape} / W_dec {w_dec.shape} do not match d_in={d_in}, d_sae={d_sae}")
    norm = raw.get("normalize_activations", "none")
    check(norm in ("none", None), f"{directory}: SAELens normalize_activations={norm!r} cannot be reproduced; "
                                  "expected 'none' (fold the normalisation into the weights and save again)")
    b_enc = t[saved.saelens_b_enc]
    params = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": t["b_dec"]}
    if not raw.get("apply_b_dec_to_input", True):
        check(saved.saelens_b_enc == "b_enc",  # a gated SAE's b_mag would need the same fold
              f"{directory}: apply_b_dec_to_input=false is not supported for {saved.name} SAEs")
        params["b_enc"] = (b_enc + t["b_dec"].astype(np.float64) @ w_enc).astype(np.float32)
    params.update(saved.from_saelens(t))
    check(not arch.uses_k or "k" in raw, f"{directory}: cfg.json of a {arch.name} SAE has no k")
    fields = {f: raw[f] for f in arch.cfg_fields}
    norms = np.linalg.norm(w_dec, axis=1)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch.name, **fields,
                    unit_norm_decoder=bool(np.allclose(norms, 1.0, atol=1e-3)), normalize_input=False)
    return cfg, params
