"""Pretrained SAEs in the formats people publish, loaded into saejax's layout.

:func:`load_sae` reads a local directory (or a ``params.npz`` file, or a hub repo id) and detects:

- **Gemma Scope** ``params.npz``: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``,
  ``b_dec``, ``threshold``; ``pre = x @ W_enc + b_enc``, ``z = (pre > threshold) * relu(pre)``.
- **SAELens** ``cfg.json`` + ``sae_weights.safetensors`` (:func:`saejax.io.load_saelens`).
- **EleutherAI sparsify** ``cfg.json`` + ``sae.safetensors`` (one subdirectory per hookpoint):
  ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``;
  ``z = topk_k(relu((x - b_dec) @ encoder.weight.T + encoder.bias))``.
- **dictionary_learning** ``ae.pt`` (a torch state dict) + ``config.json`` (``trainer.dict_class``):
  ``AutoEncoder`` (ReLU, ``bias`` subtracted before encoding and added after decoding),
  ``AutoEncoderTopK``, ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` (``z = relu(pre) *
  (relu(pre) > threshold)``, one threshold) and ``JumpReluAutoEncoder`` (no ``b_dec`` subtraction).

Each loader returns parameters for which saejax's forward
``pre = (x - b_dec) @ W_enc + b_enc``, ``x_hat = z @ W_dec + b_dec`` equals the library's own.
Where the library computes ``pre = x @ W_enc + b_enc`` the difference is folded into the encoder
bias, ``b_enc' = b_enc + b_dec @ W_enc``; a threshold ``t`` gating ``relu(pre)`` becomes
``log_threshold = log(max(t, 1e-30))``. Loaded SAEs work on raw activations (``normalize_input=False``).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from saejax import archs
from saejax.config import SAEConfig, closest
from saejax.errors import ConfigError, check
from saejax.io import load_saelens

_MARKERS = {"params.npz": "gemma_scope", "sae_weights.safetensors": "saelens", "sae.safetensors": "sparsify",
            "ae.pt": "dictionary_learning"}
_EXPECTED = ("params.npz (Gemma Scope), cfg.json + sae_weights.safetensors (SAELens), cfg.json + sae.safetensors "
             "(sparsify) or ae.pt + config.json (dictionary_learning)")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_sae(source, *, subfolder: str | None = None, hookpoint: str | None = None) -> tuple[SAEConfig, dict, dict]:
    """``(config, numpy parameters, metadata)`` of one pretrained SAE; metadata has ``format`` and ``path``.

    ``source`` is a local directory, a ``params.npz`` file, or a hub repo id (downloaded with
    ``huggingface_hub.snapshot_download``, only ``subfolder``/``hookpoint``); ``subfolder`` is a
    path inside it, ``hookpoint`` one of several SAE subdirectories (sparsify's layout).
    """
    path = _resolve(str(source), subfolder, hookpoint)
    if path.is_file():
        check(path.suffix == ".npz", f"{str(path)!r} is a file but not a params.npz; expected a directory with {_EXPECTED}")
        fmt = "gemma_scope"
    else:
        path = _select_hookpoint(path, hookpoint)
        fmt = _detect(path)
    if fmt is None:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ConfigError(f"{str(path)!r} is not a recognised SAE directory (found {found}); expected {_EXPECTED}")
    cfg, params, meta = _LOADERS[fmt](path)
    return cfg, params, {"format": fmt, "path": str(path), **meta}


# ----------------------------------------------------------------------------- locating the files
def _resolve(source: str, subfolder: str | None, hookpoint: str | None) -> Path:
    """A local path, or the snapshot of a hub repo; then ``subfolder`` inside it."""
    root = Path(source)
    if not root.exists():
        check(_REPO_ID.fullmatch(source) is not None,
              f"{source!r} does not exist; expected a local SAE directory, a params.npz file or a hub repo id 'owner/name'")
        prefix = "/".join(p for p in (subfolder, hookpoint) if p)
        check(bool(prefix), f"{source!r} is not a local path; as a hub repo it needs subfolder= (the SAE's folder "
                            "inside it, e.g. 'layer_12/width_16k/average_l0_82') so only that SAE is downloaded")
        root = _download(source, prefix)
    path = root / subfolder if subfolder else root
    check(path.exists(), f"{str(path)!r} does not exist; check subfolder={subfolder!r}")
    return path


def _download(repo: str, prefix: str) -> Path:
    """``snapshot_download(repo, allow_patterns=[prefix/*])``; any failure is one ConfigError."""
    fix = f"download it first (huggingface-cli download {repo} --include '{prefix}/*') and pass the local directory"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{repo!r} is not a local path and huggingface_hub is not installed; {fix}") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=[f"{prefix}/*"]))
    except Exception as e:  # offline, unknown repo, gated repo, network: all mean the same to the caller
        raise ConfigError(f"cannot fetch {repo!r} from the Hugging Face hub ({type(e).__name__}); {fix}") from None


def _detect(directory: Path) -> str | None:
    return next((fmt for name, fmt in _MARKERS.items() if (directory / name).is_file()), None)


def _select_hookpoint(directory: Path, hookpoint: str | None) -> Path:
    """``directory/hookpoint``; else the directory itself if it holds an SAE, else its only SAE subdirectory."""
    subs = sorted(p.name for p in directory.iterdir() if p.is_dir() and _detect(p)) if directory.is_dir() else []
    if hookpoint is not None:
        check(hookpoint in subs, f"{str(directory)!r} has no SAE for hookpoint {hookpoint!r}; "
                                 f"available: {subs}{closest(hookpoint, subs)}")
        return directory / hookpoint
    if _detect(directory) or not subs:
        return directory
    check(len(subs) == 1, f"{str(directory)!r} holds SAEs for several hookpoints; pass hookpoint= one of {subs}")
    return directory / subs[0]


# ----------------------------------------------------------------------------- reading files
def _read_json(path: Path) -> dict:
    check(path.is_file(), f"{str(path.parent)!r} has no {path.name}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({e})") from None
    check(isinstance(raw, dict), f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    return raw


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file (8-byte little-endian header size, JSON header, data);
    ``BF16`` is widened to float32 (``bits << 16``), which numpy cannot hold natively."""
    try:
        buf = np.memmap(path, np.uint8, mode="r")
        n = int(buf[:8].view("<u8")[0])
        header = json.loads(buf[8:8 + n].tobytes())
    except (ValueError, IndexError, UnicodeDecodeError):
        raise ConfigError(f"{str(path)!r} is not a safetensors file") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        raw = buf[8 + n + lo:8 + n + hi]
        if info["dtype"] == "BF16":
            arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            check(info["dtype"] in _ST_DTYPES, f"{str(path)!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
            arr = np.array(raw.view(_ST_DTYPES[info["dtype"]]))
        out[name] = arr.reshape(info["shape"])
    return out


def _torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A torch state dict (``torch.load(..., weights_only=True)``) as float32/integer numpy arrays."""
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{str(path)!r} is a torch file; install torch to read it (pip install torch)") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise ConfigError(f"{str(path)!r} is not a readable torch state dict ({type(e).__name__})") from None
    check(isinstance(sd, dict), f"{str(path)!r} must hold a state dict, got {type(sd).__name__}")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- to saejax's layout
def _take(where: Path, tensors: dict, spec: dict, d_in: int, d_sae: int) -> dict:
    """``{ours: tensors[theirs] (transposed)}`` for ``spec = {ours: (theirs, transposed)}``, shapes checked."""
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}
    out = {}
    for ours, (theirs, transposed) in spec.items():
        check(theirs in tensors, f"{str(where)!r} has no tensor {theirs!r}; found {sorted(tensors)}")
        arr = np.asarray(tensors[theirs])
        expected = want[ours][::-1] if transposed else want[ours]
        check(arr.shape == expected, f"{str(where)!r}: {theirs} has shape {arr.shape}, expected {expected} "
                                     f"(d_in={d_in}, d_sae={d_sae})")
        out[ours] = arr.T if transposed else arr
    return out


def _build(where: Path, arch: str, params: dict, *, fold_b_dec: bool = False, k: int = 32) -> tuple[SAEConfig, dict]:
    """Config and float32 parameters; ``fold_b_dec``: ``b_enc' = b_enc + b_dec @ W_enc``; a
    ``threshold`` (array or scalar) becomes ``log_threshold``."""
    p = {name: np.asarray(v, np.float64) for name, v in params.items()}
    d_in, d_sae = p["W_enc"].shape
    if fold_b_dec:
        p["b_enc"] = p["b_enc"] + p["b_dec"] @ p["W_enc"]
    if "threshold" in p:
        p["log_threshold"] = np.log(np.maximum(np.broadcast_to(p.pop("threshold"), (d_sae,)), 1e-30))
    p = {name: np.ascontiguousarray(v, np.float32) for name, v in p.items()}
    norms = np.linalg.norm(p["W_dec"], axis=1)
    try:
        cfg = SAEConfig(d_in=int(d_in), d_sae=int(d_sae), arch=arch, k=int(k), normalize_input=False,
                        unit_norm_decoder=bool(np.allclose(norms, 1.0, atol=1e-3)))
    except ConfigError as e:
        raise ConfigError(f"{str(where)!r}: {e}") from None
    return cfg, p


def _gemma_scope(path: Path):
    """``params.npz``: JumpReLU without the ``b_dec`` subtraction (Gemma Scope's tutorial forward)."""
    npz = path if path.suffix == ".npz" else path / "params.npz"
    try:
        with np.load(npz) as f:
            t = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{str(npz)!r} is not a readable .npz file ({e})") from None
    check("W_enc" in t and np.ndim(t["W_enc"]) == 2, f"{str(npz)!r} has no 2-D W_enc [d_in, d_sae]; found {sorted(t)}")
    d_in, d_sae = t["W_enc"].shape
    params = _take(npz, t, {k: (k, False) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}, d_in, d_sae)
    return (*_build(npz, "jumprelu", params, fold_b_dec=True), {})


def _saelens(path: Path):
    try:
        return (*load_saelens(path), {})
    except KeyError as e:  # a field or tensor that every SAELens export has
        raise ConfigError(f"{str(path)!r}: cfg.json / sae_weights.safetensors has no {e}") from None


_SPARSIFY_VARIANTS = ("skip_connection", "transcode", "embed_skip", "gram_lookup")
_SPARSIFY_SPEC = {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False), "W_dec": ("W_dec", False),
                  "b_dec": ("b_dec", False)}


def _sparsify(path: Path):
    """``cfg.json`` (``d_in``, ``k``, ``num_latents`` or ``expansion_factor``) + ``sae.safetensors``."""
    raw = _read_json(path / "cfg.json")
    tensors = read_safetensors(path / "sae.safetensors")
    variants = [f for f in _SPARSIFY_VARIANTS if raw.get(f)] + ["W_skip"] * ("W_skip" in tensors)
    check(not variants, f"{str(path)!r}: sparsify variant with {', '.join(variants)} is not supported; "
                        "expected a plain sparse autoencoder")
    activation = raw.get("activation", "topk")
    check(activation == "topk", f"{str(path)!r}: sparsify activation {activation!r} is not supported; expected 'topk'")
    missing = [f for f in ("d_in", "k") if f not in raw]
    check(not missing, f"{str(path / 'cfg.json')!r} has no {', '.join(missing)}")
    d_in = int(raw["d_in"])
    d_sae = int(raw.get("num_latents") or d_in * int(raw.get("expansion_factor", 32)))
    params = _take(path / "sae.safetensors", tensors, _SPARSIFY_SPEC, d_in, d_sae)
    return (*_build(path, "topk", params, k=int(raw["k"])), {})


_DL_LINEAR = {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False), "W_dec": ("decoder.weight", True),
              "b_dec": ("b_dec", False)}
_DL_PARAMS = {k: (k, False) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
_DL_CLASSES = {
    "AutoEncoder": ("relu", {**_DL_LINEAR, "b_dec": ("bias", False)}),
    "AutoEncoderTopK": ("topk", _DL_LINEAR),
    "BatchTopKSAE": ("batchtopk", _DL_LINEAR),
    "MatryoshkaBatchTopKSAE": ("batchtopk", _DL_PARAMS),
    "JumpReluAutoEncoder": ("jumprelu", {**_DL_PARAMS, "threshold": ("threshold", False)}),
}


def _dictionary_learning(path: Path):
    """``ae.pt`` + ``config.json``; the class, sizes and ``k`` come from its ``trainer`` section.

    BatchTopK runs as a JumpReLU with its one estimated threshold (dictionary_learning's default
    ``encode``); with no threshold estimated yet (``threshold < 0``) it keeps the batch top-k.
    """
    trainer = _read_json(path / "config.json").get("trainer")
    check(isinstance(trainer, dict), f"{str(path / 'config.json')!r} has no 'trainer' section")
    assert isinstance(trainer, dict)  # narrowing only: check raised otherwise
    name = trainer.get("dict_class")
    check(name in _DL_CLASSES, f"{str(path)!r}: dictionary_learning dict_class {name!r} is not supported; "
                               f"expected one of {sorted(_DL_CLASSES)}{closest(name, _DL_CLASSES)}")
    missing = [f for f in ("activation_dim", "dict_size") if f not in trainer]
    check(not missing, f"{str(path / 'config.json')!r}: trainer has no {', '.join(missing)}")
    assert isinstance(name, str)  # narrowing only: a key of _DL_CLASSES
    arch, spec = _DL_CLASSES[name]
    sd = _torch_state_dict(path / "ae.pt")
    params = _take(path / "ae.pt", sd, spec, int(trainer["activation_dim"]), int(trainer["dict_size"]))
    k = int(trainer.get("k") or sd.get("k", 32))
    if archs.get(arch).ema_threshold:  # BatchTopK: runs as a JumpReLU at its trained threshold
        check("threshold" in sd, f"{str(path / 'ae.pt')!r} has no tensor 'threshold'; found {sorted(sd)}")
        if float(sd["threshold"]) >= 0:
            arch, params["threshold"] = "jumprelu", float(sd["threshold"])
    cfg, params = _build(path, arch, params, fold_b_dec=name == "JumpReluAutoEncoder", k=k)
    return cfg, params, {"dict_class": name}


_LOADERS = {"gemma_scope": _gemma_scope, "saelens": _saelens, "sparsify": _sparsify,
            "dictionary_learning": _dictionary_learning}
