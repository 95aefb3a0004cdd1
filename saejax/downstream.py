"""Downstream checks next to stability: spliced reconstructions and probes, per seed.

Splice test: run the model with the activation at the hooked site replaced by each seed's SAE
reconstruction (controls: zero- and mean-ablation) and measure the next-token cross-entropy, the
KL divergence to the clean predictions and the fraction of loss recovered

    recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)

(zero-ablation as the reference, as in Bricken et al. 2023 / SAELens; mean-ablation is reported
too). The model forward with a replaced activation is :func:`saejax.activations.patched_logits`.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from saejax import sae
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


def sae_reconstructor(cfg, params: dict, threshold: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> decode(encode(x))`` for one SAE in raw activation units (BatchTopK: its threshold)."""
    thr = None if cfg.arch != "batchtopk" else np.float32(threshold)
    fn = jax.jit(lambda p, x: sae.decode(p, sae.encode(cfg, p, x, thr)))
    return lambda x: np.asarray(fn(params, np.asarray(x, np.float32)))


def splice(model, input_ids: np.ndarray, targets: np.ndarray, layer: int, site: str,
           replacements: dict[str, Callable], *, positions=None, mean: np.ndarray | None = None,
           batch: int = 1024) -> dict:
    """Per replacement: ``ce``, ``acc``, ``kl`` and ``loss_recovered`` (vs zero- and mean-ablation).

    ``input_ids`` ``[n, T]``; ``targets`` ``[n, T]`` next-token ids (-1 = not scored);
    ``replacements`` maps a name to ``f(acts [m, d]) -> [m, d]`` applied at ``(layer, site)`` on
    ``positions`` (None = every position). Controls ``clean``, ``zero`` and ``mean`` (needs
    ``mean``, the activation mean) are always included.
    """
    from saejax.activations import patched_logits

    check(input_ids.shape == targets.shape, f"targets {targets.shape} must match input_ids {input_ids.shape}")
    funcs = {"clean": None, "zero": np.zeros_like}
    if mean is not None:
        funcs["mean"] = lambda x: np.broadcast_to(np.asarray(mean, x.dtype), x.shape)
    funcs.update(replacements)
    logits = {name: [] for name in funcs}
    for i in range(0, len(input_ids), batch):
        ids = input_ids[i:i + batch]
        for name, f in funcs.items():
            logits[name].append(patched_logits(model, ids, layer, site, f, positions=positions))
    logits = {k: np.concatenate(v) for k, v in logits.items()}
    clean_logp = _log_softmax(logits["clean"].astype(np.float64))
    res = {k: next_token_scores(v, targets, clean_logp) for k, v in logits.items()}
    for ref in ("zero", "mean"):
        if ref not in res:
            continue
        denom = res[ref]["ce"] - res["clean"]["ce"]
        for r in res.values():
            r[f"loss_recovered_vs_{ref}"] = (res[ref]["ce"] - r["ce"]) / denom if abs(denom) > 1e-12 else float("nan")
    return res


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
    from saejax.activations import capture
    from saejax.models.modular import modular_model
    from saejax.probe import probe_seeds, usage_table

    mm = modular_model(spec.task, cache_dir=cache_dir, progress=False)
    ids, n_pos = mm.data["ids"], mm.data["ids"].shape[1]
    positions = None if spec.positions == "all" else [n_pos - 1] if spec.positions == "last" else list(spec.positions)
    per_seed = [{k: np.asarray(v[i]) for k, v in raw_params.items()} for i in range(len(seeds))]
    recon = {f"seed{s}": sae_reconstructor(cfg, p, float(t)) for s, p, t in zip(seeds, per_seed, thresholds)}
    cols, rep = {}, {}
    if "splice" in analyses:
        held = ids[mm.heldout_idx]
        targets = np.full(held.shape, -1, np.int64)
        targets[:, -1] = mm.data["answer"][mm.heldout_idx]
        import torch

        with torch.no_grad():
            acts = capture(mm.model, torch.as_tensor(ids[mm.train_idx]), [(spec.layer, spec.site)])[(spec.layer, spec.site)]
        sel = acts if positions is None else acts[:, positions]
        mean = sel.reshape(-1, sel.shape[-1]).mean(0).numpy()
        res = splice(mm.model, held, targets, spec.layer, spec.site, recon, positions=positions, mean=mean)
        rep["splice"] = res
        seeds_res = [res[f"seed{s}"] for s in seeds]
        cols["ce_clean"], cols["ce_zero_ablation"] = res["clean"]["ce"], res["zero"]["ce"]
        cols["ce_mean_ablation"] = res["mean"]["ce"]
        cols["ce_spliced"] = float(np.mean([r["ce"] for r in seeds_res]))
        cols["acc_clean"] = res["clean"]["acc"]
        cols["acc_spliced"] = float(np.mean([r["acc"] for r in seeds_res]))
        cols["kl_spliced"] = float(np.mean([r["kl"] for r in seeds_res]))
        cols["loss_recovered"], cols["loss_recovered_ci_low"], cols["loss_recovered_ci_high"] = _t_ci(
            [r["loss_recovered_vs_zero"] for r in seeds_res])
        cols["loss_recovered_vs_mean"] = float(np.mean([r["loss_recovered_vs_mean"] for r in seeds_res]))
    if "probe" in analyses:
        import torch

        with torch.no_grad():
            last = capture(mm.model, torch.as_tensor(ids), [(spec.layer, spec.site)])[(spec.layer, spec.site)][:, -1]
        raw = last.float().numpy()
        latents = np.stack([np.asarray(sae.encode(cfg, p, raw, None if cfg.arch != "batchtopk" else np.float32(t)))
                            for p, t in zip(per_seed, thresholds)])
        labels = {"answer": mm.data["answer"]}
        if spec.task == "both":
            labels["op"] = mm.data["op"]
        rep["probe"] = {}
        for name, y in labels.items():
            pr = probe_seeds(raw, latents, y, method="ridge")  # 113 classes x wide SAEs: closed form
            rep["probe"][name] = pr
            cols[f"probe_{name}_raw_acc"] = pr["raw"]["test_acc"]
            cols[f"probe_{name}_sae_acc"] = pr["sae_mean"]
            cols[f"probe_{name}_sae_ci_low"], cols[f"probe_{name}_sae_ci_high"] = pr["sae_ci_low"], pr["sae_ci_high"]
        usage_label = "op" if spec.task == "both" else "answer"
        y = labels[usage_label]
        dec = np.stack([p["W_dec"] for p in per_seed])
        rep["usage"] = {"label": usage_label, "rows": usage_table(latents, y, int(y.max()) + 1, decoders=dec)}
        corr = [r["profile_corr"] for r in rep["usage"]["rows"] if r.get("profile_corr") is not None]
        cols["usage_profile_corr"] = float(np.mean(corr)) if corr else None
    return cols, rep
