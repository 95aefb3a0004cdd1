"""Where a Hugging Face model is and what its config says: no torch, no transformers, no weights.

``model`` is one of

- a local ``save_pretrained`` directory (``config.json`` plus weights);
- a ``.gguf`` file: it is dequantised once into ``<cache>/models/<stem>-<hash>/`` (safetensors and
  tokenizer) by :func:`saejax.hf_models.materialize`, and that copy is loaded from then on;
- a hub id (``"gpt2"``, ``"org/name"``): read from the local Hugging Face cache, downloaded only
  when building (never by :func:`locate`).

Weights identity (part of every activation cache key) is by content, never by path: a directory
is the sha256 over its top-level files' names and contents, a GGUF the sha256 of the file, a hub
model its snapshot commit. So a copied directory or GGUF finds the same cache entries.

Config facts (:class:`ModelInfo`) come from ``config.json`` (of its ``text_config`` for multimodal
configs) or the GGUF header: layers = the first of ``num_hidden_layers``, ``n_layer``,
``n_layers``, ``num_layers``; width = the first of ``hidden_size``, ``n_embd``, ``dim``,
``d_model``. Encoder rule: not ``is_decoder``, no ``*ForCausalLM``/``*LMHeadModel`` architecture,
and either ``model_type`` in :data:`ENCODER_TYPES` or a ``*ForMaskedLM`` architecture.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from saejax.cache import cache_root
from saejax.digests import file_digest, files_digest
from saejax.errors import ConfigError, check

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "deberta", "deberta-v2",
                 "mpnet", "ernie", "albert", "modernbert", "megatron-bert", "mobilebert", "squeezebert", "roc_bert",
                 "data2vec-text", "nomic_bert", "luke", "esm", "funnel", "xlm-roberta-xl")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
WIDTH_KEYS = ("hidden_size", "n_embd", "dim", "d_model")
DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
MLM_HEAD_PREFIXES = ("cls.predictions.", "lm_head.", "vocab_projector.", "vocab_transform.", "generator_lm_head.",
                     "predictions.", "head.", "decoder.")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelInfo:
    """What the config says: enough to validate a spec and plan a cache without loading weights."""

    name: str
    """Real name, for cache folders and progress bars (hub id tail, GGUF stem, config ``_name_or_path``)."""
    model_type: str
    n_layers: int
    d_model: int
    encoder: bool
    architectures: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelRef:
    """A located model. ``path``: a loadable local directory, or ``None`` when building must first
    download (hub) or convert (GGUF) it; ``weights``: its content identity, ``None`` while unknown."""

    given: str
    kind: str  # "dir" | "gguf" | "hub"
    info: ModelInfo | None
    path: Path | None
    weights: str | None
    gguf: Path | None = None
    revision: str | None = None
    missing: str | None = None


def _first(cfg: dict, keys: tuple[str, ...], what: str, model: str) -> int:
    for k in keys:
        if isinstance(cfg.get(k), int):
            return cfg[k]
    raise ConfigError(f"cannot tell the {what} of {model}: its config has none of {', '.join(keys)}")


def info_from_config(cfg: dict, name: str, model: str) -> ModelInfo:
    """:class:`ModelInfo` of a ``config.json`` dict (see the module docstring for the rules)."""
    text = {**cfg, **cfg["text_config"]} if isinstance(cfg.get("text_config"), dict) else cfg
    archs = tuple(cfg.get("architectures") or ())
    mtype = str(cfg.get("model_type", ""))
    decoder = bool(text.get("is_decoder")) or any(a.endswith(DECODER_SUFFIXES) for a in archs)
    encoder = not decoder and (mtype in ENCODER_TYPES or any(a.endswith("ForMaskedLM") for a in archs))
    return ModelInfo(_clean(name), mtype, _first(text, LAYER_KEYS, "number of layers", model),
                     _first(text, WIDTH_KEYS, "width", model), encoder, archs)


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def weight_names(model_dir: Path) -> set[str]:
    """Parameter names in a directory's safetensors files, read from their headers (no tensors)."""
    names: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
    return names


def has_mlm_head(model_dir: Path, info: ModelInfo) -> bool:
    """An encoder checkpoint has masked-LM head weights: a ``*ForMaskedLM``/``*ForPreTraining``
    architecture, or safetensors parameters under one of :data:`MLM_HEAD_PREFIXES`."""
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in info.architectures):
        return True
    return any(n.startswith(MLM_HEAD_PREFIXES) for n in weight_names(model_dir))


# ----------------------------------------------------------------------------- GGUF header
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_value(buf, pos: int, vtype: int):
    """``(value, next position)``; arrays are skipped and read as ``None``."""
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace"), pos + 8 + n
    if vtype in _GGUF_SCALARS:
        fmt = "<" + _GGUF_SCALARS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    check(vtype == 9, f"unknown GGUF value type {vtype} at byte {pos}")
    etype, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _GGUF_SCALARS:
        return None, pos + n * struct.calcsize("<" + _GGUF_SCALARS[etype])
    for _ in range(n):
        _, pos = _gguf_value(buf, pos, etype)
    return None, pos


def gguf_metadata(path: Path) -> dict:
    """The scalar and string fields of a GGUF file's header (arrays skipped; no tensor is read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        check(buf[:4] == b"GGUF", f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        version, _, n_kv = struct.unpack_from("<IQQ", buf, 4)
        check(version >= 2, f"{path} is GGUF version {version}; versions 2 and 3 are supported")
        out, pos = {}, 24
        for _ in range(n_kv):
            key, pos = _gguf_value(buf, pos, 8)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            value, pos = _gguf_value(buf, pos + 4, vtype)
            if value is not None:
                out[key] = value
    return out


def gguf_info(path: Path) -> ModelInfo:
    meta = gguf_metadata(path)
    arch = str(meta.get("general.architecture", ""))
    check(arch, f"{path} has no general.architecture in its GGUF header")
    cfg = {"model_type": arch, "num_hidden_layers": meta.get(f"{arch}.block_count"),
           "hidden_size": meta.get(f"{arch}.embedding_length")}
    return info_from_config(cfg, path.stem, str(path))


def converted_dir(gguf: Path, digest: str, cache_dir=None) -> Path:
    """Where the dequantised copy of a GGUF file lives: keyed by the file's content hash, so a
    renamed copy finds the conversion of the original (``<stem>-<hash>``, whatever the stem)."""
    parent = cache_root(cache_dir) / "models"
    done = sorted(p for p in parent.glob(f"*-{digest[:16]}") if (p / "config.json").is_file()) if parent.is_dir() else []
    return done[0] if done else parent / f"{_clean(gguf.stem)}-{digest[:16]}"


# ----------------------------------------------------------------------------- locate
def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def _local_dir(model: str, p: Path, cache_dir) -> ModelRef:
    check((p / "config.json").is_file(), f"model directory {model} has no config.json (not a save_pretrained directory)")
    cfg = _read_config(p / "config.json")
    name = str(cfg.get("_name_or_path") or "").rstrip("/").split("/")[-1] or p.resolve().name
    files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
    return ModelRef(model, "dir", info_from_config(cfg, name, model), p,
                    "sha256:" + files_digest(files, p, cache_dir)[:32])


def _gguf(model: str, p: Path, cache_dir) -> ModelRef:
    check(p.is_file(), f"GGUF file {model} does not exist")
    digest = file_digest(p, cache_dir)
    out = converted_dir(p, digest, cache_dir)
    return ModelRef(model, "gguf", gguf_info(p), out if (out / "config.json").is_file() else None,
                    "gguf:" + digest[:32], gguf=p)


def offline_message(model: str) -> str:
    return (f"model {model!r} is not in the local Hugging Face cache and the hub is unreachable (HF_HUB_OFFLINE or "
            f"no network): download it with `huggingface-cli download {model}` on a machine with network, "
            f"or pass a local directory")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint (``HF_ENDPOINT``), so an offline machine says so
    at once instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _hub(model: str, revision: str | None) -> ModelRef:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    hit = try_to_load_from_cache(model, "config.json", revision=revision, cache_dir=constants.HF_HUB_CACHE)
    if not isinstance(hit, str) and not constants.HF_HUB_OFFLINE and hub_reachable():
        try:
            hit = hf_hub_download(model, "config.json", revision=revision)
        except Exception:  # unknown repo or no network: both leave the model missing
            hit = None
    if not isinstance(hit, str):
        return ModelRef(model, "hub", None, None, None, revision=revision, missing=offline_message(model))
    snap = Path(hit).parent
    has_weights = any(f.name.endswith(WEIGHT_SUFFIXES) for f in snap.iterdir())
    info = info_from_config(_read_config(Path(hit)), model.split("/")[-1], model)
    return ModelRef(model, "hub", info, snap if has_weights else None, "hub:" + snap.name, revision=revision)


def locate(model: str, revision: str | None = None, *, cache_dir=None) -> ModelRef:
    """Find ``model`` and read its config; downloads and converts nothing (see the module docstring)."""
    check(isinstance(model, str) and model, f"model must be a hub id, a directory or a .gguf file, got {model!r}")
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        return _gguf(model, p, cache_dir)
    if p.is_dir():
        return _local_dir(model, p, cache_dir)
    check(not p.exists(), f"model path {model} is neither a directory nor a .gguf file")
    check(not (model.startswith((".", "/", "~")) or model.count("/") > 1),
          f"model path {model} does not exist (expected a save_pretrained directory, a .gguf file or a hub id like 'gpt2')")
    return _hub(model, revision)
