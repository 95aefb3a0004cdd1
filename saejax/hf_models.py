"""The torch/transformers edge: load any Transformers model, find its blocks, hook its sites.

Auto class, from the config alone (:mod:`saejax.hf_locate` rules): decoder LMs load with
``AutoModelForCausalLM``; encoders with ``AutoModelForMaskedLM`` when the checkpoint has masked-LM
head weights, else ``AutoModel`` (no LM head: no splice test).

Block list, in this order: the ``blocks="path.to.layers"`` override (resolved on the model, then on
its bare base model ``model.base_model``); else :data:`BLOCK_TABLE` by ``model_type`` (paths on the
base model); else the rule: the one ``nn.ModuleList`` whose length equals ``num_hidden_layers``.

Sites of block ``L`` (TransformerLens names; ``blocks.L.hook_<site>`` spells ``(L, site)``):

- ``resid_pre``: the block's input hidden states (= ``output_hidden_states[L]``);
- ``resid_post``: the block's output (= ``output_hidden_states[L + 1]``, except for the last block
  of decoders, where Hugging Face applies the final norm to that entry and we do not);
- ``attn_out`` / ``mlp_out`` in pre-norm decoders: what the attention / MLP sublayer adds to the
  residual stream (``resid_post = resid_pre + attn_out + mlp_out``, parallel blocks too); in
  sandwich-norm families (Gemma-2/3, OLMo-2) the output of the norm after the sublayer;
- ``attn_out`` / ``mlp_out`` in post-LN encoders (BERT, RoBERTa, DistilBERT, ...): the attention
  output projection (``attention.output.dense``, DistilBERT ``attention.out_lin``) and the
  feed-forward output (``output.dense``, DistilBERT ``ffn``), each BEFORE its residual add and
  LayerNorm, so there ``resid_post = LN2(LN1(resid_pre + attn_out) + mlp_out)``.

A block with none of the listed submodules for a site is a one-line error naming them.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from saejax.errors import ConfigError, check
from saejax.hf_locate import ModelRef, converted_dir, has_mlm_head, info_from_config, locate

SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
DTYPES = ("float32", "float16", "bfloat16")
_LAYERS = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
           "gemma3_text", "phi", "phi3", "olmo", "olmo2", "stablelm", "granite", "smollm3", "gpt_neox", "cohere",
           "starcoder2", "modernbert")
BLOCK_TABLE = {**{t: "layers" for t in _LAYERS},
               **{t: "h" for t in ("gpt2", "gptj", "gpt_neo", "codegen", "bloom", "falcon", "gpt_bigcode")},
               **{t: "encoder.layer" for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "deberta",
                                                "deberta-v2", "mpnet", "ernie", "megatron-bert", "data2vec-text")},
               "opt": "decoder.layers", "gemma3": "language_model.layers", "distilbert": "transformer.layer"}
ATTN_PATHS = ("attention.output.dense", "attention.out_lin", "attn", "self_attn", "attention", "self_attention", "mixer")
MLP_PATHS = ("output.dense", "ffn", "mlp", "feed_forward", "block_sparse_moe")
_IGNORE = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.ot", "*.tflite", "*.gguf", "original/*", "onnx/*",
           "flax_model*", "tf_model*", "rust_model*", "coreml/*", "*.pth"]


# ----------------------------------------------------------------------------- loading
def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_class_name(model_dir: Path, info) -> str:
    """``AutoModelForCausalLM`` (decoders), ``AutoModelForMaskedLM`` (encoders with an MLM head) or ``AutoModel``."""
    if not info.encoder:
        return "AutoModelForCausalLM"
    return "AutoModelForMaskedLM" if has_mlm_head(model_dir, info) else "AutoModel"


VERBOSE = False
"""Show transformers' own load reports, warnings and progress bars (``python -m saejax.run -v``)."""


@contextmanager
def quiet_loading():
    """transformers' and the hub client's load reports and bars, captured unless :data:`VERBOSE`."""
    if VERBOSE:
        yield
        return
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_model(model_dir, dtype: str = "float32", device: str | None = None):
    """The model of a local directory in eval mode on ``device`` (CUDA when present, else CPU)."""
    import json

    import torch
    import transformers

    model_dir = Path(model_dir)
    check(dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    info = info_from_config(json.loads((model_dir / "config.json").read_text()), model_dir.name, str(model_dir))
    cls = getattr(transformers, auto_class_name(model_dir, info))
    with quiet_loading():
        model = cls.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device or device_name()).eval()


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF file into a ``save_pretrained`` directory (safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {gguf.name} (dequantising; once, then cached)", flush=True)
    try:
        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot load GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense already; only the marker blocks save_pretrained
        quantizer.remove_quantization_config(model)
    with quiet_loading():
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def materialize(ref: ModelRef, cache_dir=None) -> tuple[Path, str]:
    """A loadable local directory and the weights identity: downloads a hub model (if it is not in
    the local cache) or converts a GGUF file (once; the copy is keyed by the file's hash)."""
    check(ref.missing is None, ref.missing or "")
    assert ref.weights is not None  # a located (not missing) model has its weights identity
    if ref.path is not None:
        return ref.path, ref.weights
    if ref.kind == "gguf":
        assert ref.gguf is not None  # locate sets the file of every GGUF model
        dest = converted_dir(ref.gguf, ref.weights.split(":")[1], cache_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return convert_gguf(ref.gguf, dest), ref.weights
    from huggingface_hub import snapshot_download

    try:
        kw: dict[str, Any] = dict(revision=ref.revision, ignore_patterns=_IGNORE)
        path = Path(snapshot_download(ref.given, **kw, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(ref.given, **kw, allow_patterns=["*.json", "*.bin", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:
        raise ConfigError(f"cannot download model {ref.given!r} from the hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return path, "hub:" + path.name  # snapshots/<commit>


def resolve_model(model: str, revision: str | None = None, cache_dir=None) -> tuple[Path, str]:
    """:func:`saejax.hf_locate.locate` then :func:`materialize`: a local directory and weights identity."""
    return materialize(locate(model, revision, cache_dir=cache_dir), cache_dir)


# ----------------------------------------------------------------------------- blocks and sites
def _walk(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() and hasattr(root, "__getitem__") else getattr(root, part, None)
        if root is None:
            return None
    return root


def _n_layers(model) -> int | None:
    cfg: Any = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "num_hidden_layers", None)


def find_blocks(model, blocks: str | None = None):
    """The model's block list (override, then :data:`BLOCK_TABLE`, then the ModuleList rule)."""
    import torch

    base = getattr(model, "base_model", model)
    name = type(model).__name__
    if blocks is not None:
        found = next((m for m in (_walk(model, blocks), _walk(base, blocks)) if m is not None), None)
        check(isinstance(found, torch.nn.ModuleList) and len(found) > 0,
              f"model {name} has no block list at blocks={blocks!r} (expected a non-empty nn.ModuleList)")
        assert isinstance(found, torch.nn.ModuleList)  # narrowing only: check raised otherwise
        return found
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    found = _walk(base, BLOCK_TABLE[mtype]) if mtype in BLOCK_TABLE else None
    if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
        return found
    n = _n_layers(model)
    lists = [p for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n and n]
    check(len(lists) == 1, f"unknown model layout {name}: " + (
        f"several nn.ModuleLists of {n} modules ({', '.join(lists)})" if lists else
        f"no nn.ModuleList of num_hidden_layers={n} modules and model_type {mtype!r} is not in the table")
        + "; pass blocks='path.to.layers'")
    found = _walk(model, lists[0])
    assert found is not None  # a path named_modules just listed
    return found


def site_module(block, site: str):
    """``(module, 'pre' | 'out')``: where a hook on ``block`` reads ``site`` (see the module docstring)."""
    check(site in SITES, f"unknown site {site!r}: expected one of {', '.join(SITES)}")
    if site in ("resid_pre", "resid_post"):
        return block, "pre" if site == "resid_pre" else "out"
    if hasattr(block, "post_feedforward_layernorm"):  # sandwich norms: sublayer -> norm -> residual
        return getattr(block, "post_attention_layernorm" if site == "attn_out" else "post_feedforward_layernorm"), "out"
    paths = ATTN_PATHS if site == "attn_out" else MLP_PATHS
    for path in paths:
        mod = _walk(block, path)
        if mod is not None:
            return mod, "out"
    raise ConfigError(f"site {site} is not defined for {type(block).__name__} blocks: none of "
                      f"{', '.join(paths)} exists; use resid_pre or resid_post")


def _forward_kw(model) -> dict:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _check_points(blocks, points) -> None:
    n = len(blocks)
    for layer, site in points:
        check(0 <= layer < n, f"layer {layer} is out of range for a {n}-layer model: valid layers are 0..{n - 1}")
        check(site in SITES, f"unknown site {site!r}: expected one of {', '.join(SITES)}")


class _Stop(Exception):
    """Raised by the last hook to skip the rest of the forward pass."""


def _stop(*_):
    raise _Stop


def _first_tensor(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def capture(model, input_ids, points, attention_mask=None, *, stop_early: bool = True, blocks: str | None = None) -> dict:
    """One forward pass; ``{(layer, site): [batch, seq, d_model] tensor}`` for every point. With
    ``stop_early`` the pass stops right after the deepest block needed (later blocks never run)."""
    import torch

    layers = find_blocks(model, blocks)
    _check_points(layers, points)
    out, handles = {}, []

    def keep(key):
        def pre(mod, args, kwargs):
            out[key] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, o):
            out[key] = _first_tensor(o)
        return pre, post

    try:
        for layer, site in points:
            mod, when = site_module(layers[layer], site)
            pre, post = keep((layer, site))
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True) if when == "pre"
                           else mod.register_forward_hook(post))
        if stop_early:  # registered last, so it runs after the captures on the same block
            last = max(l for l, _ in points)
            only_pre = all(s == "resid_pre" for l, s in points if l == last)
            handles.append(layers[last].register_forward_pre_hook(_stop) if only_pre
                           else layers[last].register_forward_hook(_stop))
        with torch.no_grad():  # not inference_mode: callers may feed the tensors to autograd code
            try:
                model(input_ids=input_ids, attention_mask=attention_mask, **_forward_kw(model))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return out


def _swapper(replace, positions):
    import torch

    def swap(h):
        sel = h if positions is None else h[:, positions]
        new = replace(sel.reshape(-1, sel.shape[-1]).float().cpu().numpy())
        new = torch.as_tensor(np.array(new), dtype=h.dtype, device=h.device).reshape(sel.shape)
        if positions is None:
            return new
        h = h.clone()
        h[:, positions] = new
        return h
    return swap


def patched_logits(model, input_ids, layer: int, site: str, replace, *, positions=None, attention_mask=None,
                   blocks: str | None = None) -> np.ndarray:
    """Logits ``[n, T, vocab]`` (float32 numpy) of a forward pass in which the activation at
    ``(layer, site)`` is replaced by ``replace(acts)`` (numpy ``[m, d]`` -> ``[m, d]``) on
    ``positions`` (None = all). ``replace=None`` runs the clean model."""
    import torch

    dev = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(input_ids), device=dev)
    am = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), device=dev)
    handle = None
    if replace is not None:
        layers = find_blocks(model, blocks)
        _check_points(layers, [(layer, site)])
        mod, when = site_module(layers[layer], site)
        swap = _swapper(replace, positions)
        if when == "pre":
            def pre_hook(mod, args, kwargs):
                if args:
                    return (swap(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": swap(kwargs["hidden_states"])}
            handle = mod.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def post_hook(mod, args, out):
                return (swap(out[0]), *out[1:]) if isinstance(out, (tuple, list)) else swap(out)
            handle = mod.register_forward_hook(post_hook)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=am, **_forward_kw(model))
    finally:
        if handle is not None:
            handle.remove()
    check(hasattr(out, "logits"), f"model {type(model).__name__} has no LM head (its output has no logits)")
    return out.logits.float().cpu().numpy()


@contextmanager
def frozen_prefix(model, layer: int, site: str, blocks: str | None = None):
    """Forwards of one batch that patch ``(layer, site)`` run only the blocks the patch can change.

    The first forward in the block records what each block upstream of the patch returns
    (blocks ``0..layer`` for ``resid_post``, ``0..layer-1`` for the other sites); later forwards
    get those outputs back, cloned, instead of running the blocks again (hooks on those blocks
    still run, on the recorded output, as in a real call). A splice test that scores several
    replacements on the same inputs then runs the shared prefix once. Only valid for the same
    inputs (one block per batch): other ``input_ids`` or ``attention_mask`` raise, and so does a
    block that runs twice in one forward (shared or looped blocks cannot be replayed).
    """
    import torch

    layers = find_blocks(model, blocks)
    _check_points(layers, [(layer, site)])
    mod, when = site_module(layers[layer], site)
    upstream = list(layers[:layer + 1] if mod is layers[layer] and when == "out" else layers[:layer])
    saved: dict[int, Any] = {}
    state: dict[str, Any] = {"done": False, "inputs": None}

    def clone(o):
        if isinstance(o, torch.Tensor):
            return o.clone()
        return type(o)(clone(x) for x in o) if isinstance(o, (tuple, list)) else o

    def same(a, b) -> bool:
        return (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))

    def wrap(i, real):
        def forward(*args, **kwargs):
            if state["done"]:
                return clone(saved[i])
            if i in saved:
                raise RuntimeError(f"frozen_prefix: block {i} ran twice in one forward; shared or looped blocks "
                                   "cannot be replayed")
            out = real(*args, **kwargs)
            saved[i] = clone(out)
            return out
        return forward

    def before(_, args, kwargs):
        got = (kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask"))
        if state["inputs"] is None:
            state["inputs"] = tuple(clone(t) for t in got)
        elif not all(same(a, b) for a, b in zip(got, state["inputs"])):
            raise RuntimeError("frozen_prefix: the model was fed other inputs than the first forward in the block")
        if not state["done"]:
            saved.clear()  # an interrupted first forward (a capture that stops early) records again

    def after(*_):
        state["done"] = len(saved) == len(upstream)

    prior = [b.__dict__.get("forward") for b in upstream]
    for i, b in enumerate(upstream):
        b.forward = wrap(i, b.forward)  # the instance attribute shadows the class's forward
    handles = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for b, f in zip(upstream, prior):
            if f is None:
                b.__dict__.pop("forward", None)
            else:
                b.forward = f
