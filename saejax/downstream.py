"""Downstream checks next to stability: spliced reconstructions and probes, per seed.

Splice test: run the model with the activation at the hooked site replaced by each seed's SAE
reconstruction (controls: zero- and mean-ablation) and measure the next-token cross-entropy, the
KL divergence to the clean predictions and the fraction of loss recovered

    recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)

(zero-ablation as the reference, as in Bricken et al. 2023 / SAELens; mean-ablation is reported
too). The model forward with a replaced activation is :func:`saejax.hf_models.patched_logits`;
the blocks before the patched site run once per batch (:func:`saejax.hf_models.frozen_prefix`).

:func:`modular_downstream` runs both analyses on the embedded modular model, :func:`hf_downstream`
on any Hugging Face source (:class:`saejax.activations.HF`). Within one process the loaded model
and the activations every cell shares are computed once (the runner calls these per cell).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from saejax import archs, sae
from saejax.errors import check


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def next_token_scores(logits: np.ndarray, targets: np.ndarray, clean_logp: np.ndarray | None = None) -> dict:
    """CE (nats), accuracy and, given the clean log-probabilities, KL(clean || this), over all
    positions with a target >= 0. ``logits`` ``[..., vocab]``, ``targets`` ``[...]``."""
    logp = _log_softmax(logits.astype(np.float64))
    ok = targets >= 0
    tgt = np.where(ok, targets, 0)
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    out = {"ce": float(nll[ok].mean()), "acc": float((logp.argmax(-1) == tgt)[ok].mean())}
    if clean_logp is not None:
        kl = (np.exp(clean_logp) * (clean_logp - logp)).sum(-1)
        out["kl"] = float(kl[ok].mean())
    return out


@partial(jax.jit, static_argnums=0)
def _reconstruct(cfg, params: dict, x, threshold):
    return sae.decode(params, sae.encode(cfg, params, x, threshold))


_encode = jax.jit(sae.encode, static_argnums=0)


def seed_latents(cfg, seeds: list[tuple[dict, float | None]], x: np.ndarray) -> np.ndarray:
    """``[S, n, d_sae]``: the latents of ``x`` under each ``(params, threshold)`` (BatchTopK: its trained threshold)."""
    thr = archs.get(cfg.arch).threshold
    return np.stack([np.asarray(_encode(cfg, p, x, thr(None if t is None else np.float32(t)))) for p, t in seeds])


def sae_reconstructor(cfg, params: dict, threshold: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> decode(encode(x))`` for one SAE in raw activation units (BatchTopK: its threshold).
    One compiled program per SAE config and batch shape, shared by every seed."""
    thr = archs.get(cfg.arch).threshold(None if threshold is None else np.float32(threshold))
    params = jax.tree.map(jnp.asarray, params)
    return lambda x: np.asarray(_reconstruct(cfg, params, np.asarray(x, np.float32), thr))


def _sums(logits: np.ndarray, targets: np.ndarray, clean_logp: np.ndarray) -> np.ndarray:
    """``[nll, correct, kl, count]`` summed over the positions with a target >= 0."""
    logp = _log_softmax(logits.astype(np.float64))
    ok = targets >= 0
    tgt = np.where(ok, targets, 0)
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    kl = (np.exp(clean_logp) * (clean_logp - logp)).sum(-1)
    return np.array([nll[ok].sum(), (logp.argmax(-1) == tgt)[ok].sum(), kl[ok].sum(), ok.sum()], np.float64)


def splice(model, input_ids: np.ndarray, targets: np.ndarray, layer: int, site: str,
           replacements: dict[str, Callable], *, positions=None, mean: np.ndarray | None = None,
           batch: int = 1024, attention_mask: np.ndarray | None = None, blocks: str | None = None) -> dict:
    """Per replacement: ``ce``, ``acc``, ``kl`` and ``loss_recovered`` (vs zero- and mean-ablation).

    ``input_ids`` ``[n, T]``; ``targets`` ``[n, T]`` token ids scored at each position (-1 = not
    scored; next tokens for a causal LM, the masked-out tokens for a masked LM); ``replacements``
    maps a name to ``f(acts [m, d]) -> [m, d]`` applied at ``(layer, site)`` on ``positions``
    (None = every position). Controls ``clean``, ``zero`` and ``mean`` (needs ``mean``, the
    activation mean) are always included. Scores accumulate batch by batch (no logits are kept).
    """
    from saejax.hf_models import frozen_prefix, patched_logits

    check(input_ids.shape == targets.shape, f"targets {targets.shape} must match input_ids {input_ids.shape}")
    funcs = {"clean": None, "zero": np.zeros_like}
    if mean is not None:
        funcs["mean"] = lambda x: np.broadcast_to(np.asarray(mean, x.dtype), x.shape)
    funcs.update(replacements)
    sums = {name: np.zeros(4) for name in funcs}
    for i in range(0, len(input_ids), batch):
        ids, tg = input_ids[i:i + batch], targets[i:i + batch]
        am = None if attention_mask is None else attention_mask[i:i + batch]
        clean_logp = None
        with frozen_prefix(model, layer, site, blocks):  # the blocks before the patch run once per batch
            for name, f in funcs.items():
                logits = patched_logits(model, ids, layer, site, f, positions=positions, attention_mask=am, blocks=blocks)
                clean_logp = _log_softmax(logits.astype(np.float64)) if clean_logp is None else clean_logp
                sums[name] += _sums(logits, tg, clean_logp)
    res = {k: {"ce": v[0] / v[3], "acc": v[1] / v[3], "kl": v[2] / v[3]} for k, v in sums.items()}
    for ref in ("zero", "mean"):
        if ref not in res:
            continue
        denom = res[ref]["ce"] - res["clean"]["ce"]
        for r in res.values():
            r[f"loss_recovered_vs_{ref}"] = (res[ref]["ce"] - r["ce"]) / denom if abs(denom) > 1e-12 else float("nan")
    return {k: {m: float(x) for m, x in v.items()} for k, v in res.items()}


# ----------------------------------------------------------------------------- runner glue
def _t_ci(values) -> tuple[float, float, float]:
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) < 2 or v.std() == 0:
        m = float(v.mean()) if len(v) else float("nan")
        return m, m, m
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(v.mean()), float(lo), float(hi)


def modular_downstream(spec, cfg, raw_params: dict, thresholds, seeds, *, analyses=("splice", "probe"),
                       cache_dir=None) -> tuple[dict, dict]:
    """Splice test and probes of one cell's seeds on the embedded modular model.

    ``spec``: the experiment's :class:`saejax.experiment.Modular` source; ``raw_params``: stacked
    ``[S, ...]`` SAE parameters in raw units. Splicing runs on the held-out prompts and scores the
    answer token; probes read the activation at the ``=`` position of every prompt (labels:
    the answer, and the operation for the combined task), with a 75/25 split and the closed-form
    ridge probe of :func:`saejax.probe.fit_probe` (113 classes on up to 1024 latents).
    Returns ``(columns for summary.json, full report)``.
    """
    mm = _modular_model(spec.task, spec.config(), cache_dir)
    n_pos = mm.data["ids"].shape[1]
    positions = None if spec.positions == "all" else [n_pos - 1] if spec.positions == "last" else list(spec.positions)
    per_seed = [{k: np.asarray(v[i]) for k, v in raw_params.items()} for i in range(len(seeds))]
    recon = {f"seed{s}": sae_reconstructor(cfg, p, float(t)) for s, p, t in zip(seeds, per_seed, thresholds)}
    acts = _modular_acts(spec.task, spec.config(), cache_dir, spec.layer, spec.site)
    cols, rep = {}, {}
    if "splice" in analyses:
        rep["splice"] = _modular_splice(mm, spec, recon, positions, acts)
        cols.update(_splice_columns(rep["splice"], seeds))
    if "probe" in analyses:
        probe_rep, probe_cols = _modular_probe(mm, spec, cfg, per_seed, thresholds, acts)
        rep.update(probe_rep)
        cols.update(probe_cols)
    return cols, rep


@lru_cache(maxsize=1)
def _modular_model(task: str, config, cache_dir):
    from saejax.models.modular import modular_model

    return modular_model(task, config=config, cache_dir=cache_dir, progress=False)


@lru_cache(maxsize=2)
def _modular_acts(task: str, config, cache_dir, layer: int, site: str) -> np.ndarray:
    """``[prompts, T, d]``: the activation at ``(layer, site)`` of every prompt (read-only)."""
    import torch

    from saejax.activations import capture

    mm = _modular_model(task, config, cache_dir)
    with torch.no_grad():
        acts = capture(mm.model, torch.as_tensor(mm.data["ids"]), [(layer, site)])[(layer, site)].float().numpy()
    acts.flags.writeable = False
    return acts


def _modular_splice(mm, spec, recon: dict[str, Callable], positions: list[int] | None, acts: np.ndarray) -> dict:
    """:func:`splice` on the held-out prompts, scoring the answer token (last position); the
    mean-ablation control is the activation mean over the training prompts (``acts``: every
    prompt's activation at the hooked site)."""
    held = mm.data["ids"][mm.heldout_idx]
    targets = np.full(held.shape, -1, np.int64)
    targets[:, -1] = mm.data["answer"][mm.heldout_idx]
    acts = acts[mm.train_idx]
    sel = acts if positions is None else acts[:, positions]
    mean = sel.reshape(-1, sel.shape[-1]).mean(0)
    return splice(mm.model, held, targets, spec.layer, spec.site, recon, positions=positions, mean=mean)


def _modular_probe(mm, spec, cfg, per_seed: list[dict], thresholds, acts: np.ndarray) -> tuple[dict, dict]:
    """Ridge probes of raw activations vs each seed's latents at the ``=`` position of every
    prompt (labels: the answer, and the operation for the combined task), then the latent usage
    table. Returns ``(report entries "probe" and "usage", columns)``."""
    from saejax.probe import probe_seeds

    raw = np.array(acts[:, -1])
    latents = seed_latents(cfg, list(zip(per_seed, thresholds)), raw)
    labels = {"answer": mm.data["answer"]}
    if spec.task == "both":
        labels["op"] = mm.data["op"]
    probes: dict[str, dict] = {}
    cols: dict = {}
    for name, y in labels.items():
        pr = probe_seeds(raw, latents, y, method="ridge")  # 113 classes x wide SAEs: closed form
        probes[name] = pr
        cols[f"probe_{name}_raw_acc"] = pr["raw"]["test_acc"]
        cols[f"probe_{name}_sae_acc"] = pr["sae_mean"]
        cols[f"probe_{name}_sae_ci_low"], cols[f"probe_{name}_sae_ci_high"] = pr["sae_ci_low"], pr["sae_ci_high"]
        cols.update(_probe_extras(f"probe_{name}", pr))
    usage_label = "op" if spec.task == "both" else "answer"
    usage, cols["usage_profile_corr"] = _usage(latents, labels[usage_label], usage_label, per_seed)
    return {"probe": probes, "usage": usage}, cols


def _usage(latents: np.ndarray, y: np.ndarray, label: str, per_seed: list[dict]) -> tuple[dict, float | None]:
    """The latent usage table for ``label`` (with the seeds' decoders) and its mean profile correlation."""
    from saejax.probe import usage_table

    dec = np.stack([p["W_dec"] for p in per_seed])
    usage = {"label": label, "rows": usage_table(latents, y, int(y.max()) + 1, decoders=dec)}
    corr = [r["profile_corr"] for r in usage["rows"] if r.get("profile_corr") is not None]
    return usage, float(np.mean(corr)) if corr else None

# ----------------------------------------------------------------------------- Hugging Face sources
def _per_seed(raw_params: dict, thresholds, seeds) -> list[tuple[dict, float | None]]:
    return [({k: np.asarray(v[i]) for k, v in raw_params.items()}, None if t is None else float(t))
            for i, t in zip(range(len(seeds)), thresholds)]


def heldout_contexts(reader, max_contexts: int) -> tuple[np.ndarray, list[int]]:
    """Up to ``max_contexts`` cached contexts whose rows all lie in the reader's held-out tail
    (never trained on), sharing one layout of kept positions, and those positions."""
    tokens, mask = reader.extra("tokens").astype(np.int64), reader.extra("mask")
    first_row = np.cumsum(mask.sum(1)) - mask.sum(1)
    held = np.flatnonzero((first_row >= reader.n_tokens) & mask.any(1))
    check(len(held) > 0, f"cache {reader.path.name} has no whole held-out context; raise heldout_frac or n_tokens")
    same = [i for i in held if np.array_equal(mask[i], mask[held[0]])][:max_contexts]
    return tokens[same], np.flatnonzero(mask[held[0]]).tolist()


def _targets(ids: np.ndarray, positions: list[int], encoder: bool, mask_id: int | None, pad: int | None):
    """``(inputs, targets)``: next tokens for a causal LM; for a masked LM 15% of the kept
    positions (at least one per context, drawn from a fixed seed) replaced by [MASK] and scored."""
    if not encoder:
        targets = np.full(ids.shape, -1, np.int64)
        targets[:, :-1] = ids[:, 1:]
        if pad is not None:
            targets[targets == pad] = -1
        return ids, targets
    check(mask_id is not None, "the masked-LM splice needs a tokenizer with a mask token")
    rng = np.random.default_rng(0)
    pos = np.asarray(positions)
    n_mask = max(1, int(round(0.15 * len(pos))))
    chosen = np.stack([rng.choice(pos, n_mask, replace=False) for _ in range(len(ids))])
    rows = np.arange(len(ids))[:, None]
    targets = np.full(ids.shape, -1, np.int64)
    targets[rows, chosen] = ids[rows, chosen]
    inputs = ids.copy()
    inputs[rows, chosen] = mask_id
    return inputs, targets


def _splice_columns(res: dict, seeds) -> dict:
    seeds_res = [res[f"seed{s}"] for s in seeds]
    cols = {"ce_clean": res["clean"]["ce"], "ce_zero_ablation": res["zero"]["ce"], "ce_mean_ablation": res["mean"]["ce"],
            "ce_spliced": float(np.mean([r["ce"] for r in seeds_res])), "acc_clean": res["clean"]["acc"],
            "acc_spliced": float(np.mean([r["acc"] for r in seeds_res])),
            "kl_spliced": float(np.mean([r["kl"] for r in seeds_res]))}
    cols["loss_recovered"], cols["loss_recovered_ci_low"], cols["loss_recovered_ci_high"] = _t_ci(
        [r["loss_recovered_vs_zero"] for r in seeds_res])
    cols["loss_recovered_vs_mean"] = float(np.mean([r["loss_recovered_vs_mean"] for r in seeds_res]))
    return cols


def _probe_extras(prefix: str, pr: dict) -> dict:
    """The PCA baseline and macro F1 columns of a :func:`saejax.probe.probe_seeds` result."""
    return {f"{prefix}_pca_acc": pr["pca"]["test_acc"], f"{prefix}_pca_components": pr["pca_components"],
            f"{prefix}_raw_macro_f1": pr["raw"]["macro_f1"], f"{prefix}_pca_macro_f1": pr["pca"]["macro_f1"],
            f"{prefix}_sae_macro_f1": pr["sae_macro_f1"]}


def _probe_inputs(ex, info, tok, path: str, label_field: str) -> tuple[list[list[int]], list[int], np.ndarray]:
    """Token windows of a labelled ``.jsonl`` (``text`` + ``label_field``), the index of each
    window's last non-special token, and class indices of the labels (sorted label values)."""
    from saejax.contexts import window_for

    check(path.endswith(".jsonl") and os.path.isfile(path), f"probe_dataset must be an existing .jsonl file, got {path!r}")
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    check(len(rows) >= 4 and all(isinstance(r, dict) and "text" in r and label_field in r for r in rows),
          f"probe_dataset {path} needs at least 4 rows, each with 'text' and {label_field!r}")
    window = window_for(ex, info, tok, {})
    body = ex.ctx_len - len(window.prefix) - len(window.suffix)
    seqs, last = [], []
    for r in rows:
        ids = tok(str(r["text"]), add_special_tokens=False)["input_ids"][:body]
        check(len(ids) > 0, f"probe_dataset {path} has an empty text")
        seqs.append(list(window.prefix) + list(ids) + list(window.suffix))
        last.append(len(window.prefix) + len(ids) - 1)
    classes = sorted({str(r[label_field]) for r in rows})
    return seqs, last, np.array([classes.index(str(r[label_field])) for r in rows])


@lru_cache(maxsize=1)
def _hf_model(model_dir: str, dtype: str, weights: str):
    """The model (eval mode) and tokenizer of a local directory, loaded once per process per
    ``weights`` identity (a directory saved again with other weights loads again)."""
    from transformers import AutoTokenizer

    from saejax.hf_models import load_model

    return load_model(model_dir, dtype), AutoTokenizer.from_pretrained(model_dir)


@lru_cache(maxsize=2)
def _hf_probe_data(model_dir: str, weights: str, ex, info, path: str, label: str, stamp) -> tuple[np.ndarray, np.ndarray]:
    """Raw activations and class indices of a probe dataset (``stamp``: the file's mtime and size)."""
    model, tok = _hf_model(model_dir, ex.dtype, weights)
    seqs, last, y = _probe_inputs(ex, info, tok, path, label)
    (layer, site), = ex.points
    raw = _probe_acts(model, seqs, last, layer, site, ex.blocks, tok.pad_token_id if tok.pad_token_id is not None else 0)
    raw.flags.writeable = y.flags.writeable = False
    return raw, y


def _probe_acts(model, seqs, last, layer, site, blocks, pad: int, batch: int = 16) -> np.ndarray:
    import torch

    from saejax.hf_models import capture

    out = []
    for i in range(0, len(seqs), batch):
        part = seqs[i:i + batch]
        width = max(map(len, part))
        ids = np.full((len(part), width), pad, np.int64)
        am = np.zeros((len(part), width), np.int64)
        for j, s in enumerate(part):
            ids[j, :len(s)], am[j, :len(s)] = s, 1
        acts = capture(model, torch.as_tensor(ids), [(layer, site)], torch.as_tensor(am), blocks=blocks)[(layer, site)]
        out.append(acts[torch.arange(len(part)), torch.as_tensor(last[i:i + batch])].float().cpu().numpy())
    return np.concatenate(out)


def hf_downstream(spec, cfg, raw_params: dict, thresholds, seeds, *, analyses=("splice", "probe"), cache_dir=None,
                  max_contexts: int = 64, batch: int = 8) -> tuple[dict, dict]:
    """Splice test and probes of one cell's seeds on a Hugging Face source (:class:`saejax.activations.HF`).

    Splice: each seed's reconstruction replaces the activation at the hooked site, on the kept
    positions of up to ``max_contexts`` held-out contexts; decoders score next tokens, encoders
    with a masked-LM head the 15% masked tokens (an encoder without one is a ConfigError).
    Probe (needs ``spec.probe_dataset``): activations at the last non-special token of each text,
    raw vs each seed's latents (:func:`saejax.probe.probe_seeds`). Returns ``(columns, report)``
    with the columns of :func:`modular_downstream`.
    """
    from saejax.activations import hf_source, locate, spec_from_source
    from saejax.errors import ConfigError
    from saejax.hf_models import auto_class_name, materialize
    from saejax.probe import probe_seeds

    ex, _ = spec_from_source(spec)
    (layer, site), = ex.points
    ref = locate(ex.model, ex.revision, cache_dir=cache_dir)
    reader = hf_source(spec, cache_dir=cache_dir, progress=False)
    model_dir, weights = materialize(ref, cache_dir)
    assert ref.info is not None  # materialize raised ConfigError if the model is missing
    head = auto_class_name(model_dir, ref.info)
    if "splice" in analyses and head == "AutoModel":
        raise ConfigError(f"splice is not available for {ref.info.name}: it has no LM head")
    model, tok = _hf_model(str(model_dir), ex.dtype, weights)
    per_seed = _per_seed(raw_params, thresholds, seeds)
    cols, rep = {}, {}
    if "splice" in analyses:
        ids, positions = heldout_contexts(reader, max_contexts)
        inputs, targets = _targets(ids, positions, ref.info.encoder, tok.mask_token_id, None)
        recon = {f"seed{s}": sae_reconstructor(cfg, p, t) for s, (p, t) in zip(seeds, per_seed)}
        mean = reader.take(np.arange(min(reader.n_tokens, 16384))).mean(0)
        rep["splice"] = splice(model, inputs, targets, layer, site, recon, positions=positions, mean=mean,
                               batch=batch, blocks=ex.blocks)
        cols.update(_splice_columns(rep["splice"], seeds))
    if "probe" in analyses:
        check(getattr(spec, "probe_dataset", None), f"the probe analysis on {ref.info.name} needs probe_dataset= "
                                                    f"(a .jsonl with 'text' and a label field)")
        path, label = spec.probe_dataset, getattr(spec, "probe_label", "label")
        stamp = os.stat(path) if os.path.isfile(path) else None
        raw, y = _hf_probe_data(str(model_dir), weights, ex, ref.info, path, label, stamp and (stamp.st_mtime_ns, stamp.st_size))
        latents = seed_latents(cfg, per_seed, raw)
        pr = probe_seeds(raw, latents, y)
        rep["probe"] = {"label": pr}
        cols["probe_label_raw_acc"], cols["probe_label_sae_acc"] = pr["raw"]["test_acc"], pr["sae_mean"]
        cols["probe_label_sae_ci_low"], cols["probe_label_sae_ci_high"] = pr["sae_ci_low"], pr["sae_ci_high"]
        cols.update(_probe_extras("probe_label", pr))
    return cols, rep
