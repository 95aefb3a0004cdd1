"""The embedded default model: a 2-layer GPT-2 trained on modular arithmetic (p = 113).

The subject of the modular-arithmetic SAE stability study: prompts ``a b =`` (``a op b =`` for the
combined task) and the model predicts ``(a op b) mod p`` at the ``=`` position. It is a plain
``transformers.GPT2LMHeadModel`` (2 layers, d_model 128, 4 heads, d_mlp 512, untied unembedding,
no dropout) so its activations come out of exactly the same extraction path as any hub model
(:mod:`saejax.activations`, with the prompts as :class:`~saejax.activations.TokenIds`).

Vocabulary: ``0 .. p-1`` are the numbers, ``p`` is ``+``, ``p+1`` is ``*``, ``p+2`` is ``=``.

Training (:func:`train_modular`) is deterministic: AdamW (betas 0.9/0.98, weight decay 1.0) with a
linear warm-up, minibatches of 512 drawn from ``(seed, step)``, on a fixed random fraction of all
pairs; it stops at the first evaluation where held-out accuracy reaches 99%. Minibatches rather
than the full batch: on a 2-core CPU a full-batch step over half the table costs ~10x a minibatch
step, and the minibatch run generalizes within a few hundred steps instead of thousands. The model
is saved with ``save_pretrained`` under ``<cache>/models/modular-<task>-<config hash>/`` together
with ``training.json`` (accuracy, steps, seconds), so later runs load it in seconds.

Measured with the defaults (:data:`TUNED`) on a 2-core x86-64 CPU, no GPU, one torch thread, while
other jobs kept the load average at 4-7 (so wall times are pessimistic):

======  =====  ==================  ============  ============================================
task    steps  held-out accuracy   wall time     notes
======  =====  ==================  ============  ============================================
add       400  99.78%              123 s         train fraction 0.5, batch 512
mul       350  99.69%              50 s          train fraction 0.5, batch 512
both     2050  99.79% (add 99.69%, 1301 s        batch 1024; about 7 CPU-minutes of compute,
               mul 99.89%)                       so over the 3-minute budget even when idle
======  =====  ==================  ============  ============================================

Token positions: by default every prompt position becomes an activation row (``positions="all"``:
3 rows per prompt for ``add``/``mul``, 4 for ``both``); ``positions="last"`` keeps only the ``=``
position, the one that carries the answer. Prompts are shuffled once (fixed seed) before extraction,
so the reader's held-out tail is a uniformly random subset of prompts; :func:`row_labels` maps each
cached row back to its prompt, operands, op and answer for probes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from saejax.cache import CachedActivations, cache_root, fingerprint_key
from saejax.data import SourcePlan
from saejax.errors import check

TASKS = ("add", "mul", "both")
MODEL_VERSION = 1  # bump when training code changes the weights: old saved models then miss


@dataclass(frozen=True)
class ModularConfig:
    """How the embedded model is trained; every field is part of the saved model's key."""

    task: str = "add"
    """``add``: ``(a + b) mod p``; ``mul``: ``(a * b) mod p``; ``both``: an op token picks one."""
    p: int = 113
    """The modulus (a prime, as in Nanda et al. 2023, arXiv:2301.05217)."""
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    train_frac: float = 0.5
    """Fraction of all prompts trained on; the rest is the held-out set accuracy is measured on."""
    lr: float = 1e-3
    weight_decay: float = 1.0
    warmup: int = 100
    """Linear learning-rate warm-up steps."""
    batch_size: int = 512
    max_steps: int = 4000
    """Give up (and report the accuracy reached) after this many steps."""
    eval_every: int = 50
    target_acc: float = 0.99
    """Stop at the first evaluation with held-out accuracy at least this."""
    seed: int = 0

    def __post_init__(self):
        check(self.task in TASKS, f"modular task must be one of {', '.join(TASKS)}, got {self.task!r}")
        check(self.p > 2, f"modular p must be > 2, got {self.p}")
        check(0 < self.train_frac < 1, f"train_frac must be in (0, 1), got {self.train_frac}")
        check(self.max_steps > 0 and self.eval_every > 0, "max_steps and eval_every must be positive")

    @property
    def key(self) -> str:
        return fingerprint_key({"version": MODEL_VERSION, **asdict(self)})


# Defaults per task, tuned on a 2-core CPU. The combined task needs a larger batch: with 512 its
# gradient noise let one op (addition) stall near 20% held-out accuracy while the other was learned.
TUNED = {
    "add": ModularConfig("add"),
    "mul": ModularConfig("mul"),
    "both": ModularConfig("both", batch_size=1024, max_steps=4000),
}


def default_config(task: str = "add") -> ModularConfig:
    check(task in TASKS, f"modular task must be one of {', '.join(TASKS)}, got {task!r}")
    return TUNED[task]


def prompts(task: str = "add", p: int = 113) -> dict[str, np.ndarray]:
    """Every prompt of ``task`` in canonical order: ``ids`` ``[n, 3|4]``, ``a``, ``b``, ``op``
    (0 = add, 1 = mul) and ``answer`` = ``(a op b) mod p``."""
    check(task in TASKS, f"modular task must be one of {', '.join(TASKS)}, got {task!r}")
    a, b = (g.ravel() for g in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    eq = np.full_like(a, p + 2)
    if task == "both":
        op = np.repeat([0, 1], len(a))
        a, b, eq = np.tile(a, 2), np.tile(b, 2), np.tile(eq, 2)
        ids = np.stack([a, p + op, b, eq], 1)
    else:
        op = np.full_like(a, int(task == "mul"))
        ids = np.stack([a, b, eq], 1)
    answer = np.where(op == 0, (a + b) % p, (a * b) % p)
    return {"ids": ids.astype(np.int64), "a": a, "b": b, "op": op, "answer": answer}


def split(cfg: ModularConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out prompt indices (a fixed permutation of the canonical order)."""
    n = len(prompts(cfg.task, cfg.p)["ids"])
    perm = np.random.default_rng([cfg.seed, 0]).permutation(n)
    n_train = int(round(cfg.train_frac * n))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def build_model(cfg: ModularConfig):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    conf = GPT2Config(vocab_size=cfg.p + 3, n_positions=4 if cfg.task == "both" else 3, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.n_inner, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None, pad_token_id=None)
    return GPT2LMHeadModel(conf)


def accuracy(model, ids: np.ndarray, answer: np.ndarray, p: int, chunk: int = 8192) -> float:
    """Fraction of prompts whose argmax over the ``p`` number tokens at ``=`` is the answer."""
    import torch

    hits = 0
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            logits = model(input_ids=torch.from_numpy(ids[i : i + chunk])).logits[:, -1, :p]
            hits += int((logits.argmax(-1).numpy() == answer[i : i + chunk]).sum())
    return hits / len(ids)


def train_modular(cfg: ModularConfig, *, progress: bool = True, threads: int = 1):
    """Train the model from scratch; returns ``(model, info)`` with the accuracy reached.

    ``threads``: torch intra-op threads while training. One by default: the matmuls are small, a
    second thread buys little, and on a machine shared with other jobs OpenMP threads spin-waiting
    on each other made steps 7x slower in our measurements.
    """
    import torch

    from saejax.progress import bar as progress_bar

    data = prompts(cfg.task, cfg.p)
    tr, te = split(cfg)
    x, y = torch.from_numpy(data["ids"][tr]), torch.from_numpy(data["answer"][tr])
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)))
    gen = torch.Generator().manual_seed(cfg.seed)
    acc, t0, c0, step = 0.0, time.time(), time.process_time(), 0
    bar = progress_bar(cfg.max_steps, f"train modular-{cfg.task}", enabled=progress)
    try:
        while step < cfg.max_steps:
            idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
            logits = model(input_ids=x[idx]).logits[:, -1, : cfg.p]
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                acc = accuracy(model.eval(), data["ids"][te], data["answer"][te], cfg.p)
                model.train()
                bar.set_postfix(loss=f"{loss.item():.3f}", heldout_acc=f"{acc:.4f}")
                if acc >= cfg.target_acc:
                    break
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    model.eval()
    by_op = {name: accuracy(model, data["ids"][te][sel], data["answer"][te][sel], cfg.p)
             for name, sel in (("add", data["op"][te] == 0), ("mul", data["op"][te] == 1)) if sel.any()}
    info = {"task": cfg.task, "heldout_accuracy": acc, "heldout_accuracy_by_op": by_op, "reached_target": acc >= cfg.target_acc, "steps": step,
            "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "train_accuracy": accuracy(model, data["ids"][tr], data["answer"][tr], cfg.p),
            "n_train": len(tr), "n_heldout": len(te), "config": asdict(cfg)}
    return model, info


def model_dir(cfg: ModularConfig, cache_dir=None) -> Path:
    return cache_root(cache_dir) / "models" / f"modular-{cfg.task}-{cfg.key}"


def load_or_train(task: str = "add", *, config: ModularConfig | None = None, cache_dir=None,
                  progress: bool = True) -> tuple[Path, dict]:
    """The saved model directory and its ``training.json`` info, training it first if needed."""
    cfg = config or default_config(task)
    check(cfg.task == task, f"config.task {cfg.task!r} disagrees with task {task!r}")
    final = model_dir(cfg, cache_dir)
    if (final / "training.json").is_file():
        return final, json.loads((final / "training.json").read_text())
    print(f"training the embedded modular-{cfg.task} model (once, then cached; about 70 s on 2 CPU cores)", flush=True)
    model, info = train_modular(cfg, progress=progress)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from saejax.hf_models import quiet_loading

    with quiet_loading():  # transformers' "Writing model shards" bar
        model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=1))  # written last: marks the dir complete
    try:
        os.replace(tmp, final)
    except OSError:  # trained concurrently by another process; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return final, json.loads((final / "training.json").read_text())


@dataclass
class ModularModel:
    """The trained model with its whole dataset, for probes: ``data`` as in :func:`prompts`;
    ``train_idx``/``heldout_idx`` index it; ``info`` is the training record."""

    model: object
    path: Path
    config: ModularConfig
    data: dict
    train_idx: np.ndarray
    heldout_idx: np.ndarray
    info: dict


def modular_model(task: str = "add", *, config: ModularConfig | None = None, cache_dir=None,
                  progress: bool = True) -> ModularModel:
    """Train-or-load the model and return it (torch, eval mode) with its prompts and labels."""
    from saejax.activations import load_model

    cfg = config or default_config(task)
    path, info = load_or_train(task, config=cfg, cache_dir=cache_dir, progress=progress)
    tr, te = split(cfg)
    return ModularModel(load_model(path, device="cpu"), path, cfg, prompts(cfg.task, cfg.p), tr, te, info)


def shuffled_prompts(cfg: ModularConfig) -> np.ndarray:
    """Canonical prompt indices in the (fixed) order extraction writes them."""
    return np.random.default_rng([cfg.seed, 1]).permutation(len(prompts(cfg.task, cfg.p)["ids"]))


def _positions(positions, length: int):
    if isinstance(positions, str):
        check(positions in ("all", "last"), f"positions must be 'all', 'last' or a tuple of ints, got {positions!r}")
        return None if positions == "all" else (length - 1,)
    return tuple(int(p) for p in positions)


def plan_activations(task: str = "add", layer: int = 1, site: str = "resid_post", positions="all", *,
                     config: ModularConfig | None = None, cache_dir=None) -> SourcePlan:
    """What :func:`modular_activations` would do and give, from the config alone (nothing trained)."""
    from saejax.activations import SITES, parse_hook
    from saejax.cache import default_heldout

    cfg = config or default_config(task)
    (layer, site), = parse_hook(site, (layer,)) if site in SITES else parse_hook(site)
    check(0 <= layer < cfg.n_layer, f"layer {layer} is out of range for the {cfg.n_layer}-layer modular model: "
                                    f"valid layers are 0..{cfg.n_layer - 1}")
    ids = prompts(cfg.task, cfg.p)["ids"]
    pos = _positions(positions, ids.shape[1])
    total = len(ids) * (ids.shape[1] if pos is None else len(pos))
    trained = (model_dir(cfg, cache_dir) / "training.json").is_file()
    lines = ("model: in the cache" if trained else "model: trains first (about 70 s on 2 CPU cores)",
             f"activations: {total:,} rows x {cfg.n_embd} ({total * cfg.n_embd * 4 / 2**20:.1f} MiB), "
             "extracted once and cached")
    return SourcePlan(cfg.n_embd, total - default_heldout(total), lines)


def modular_activations(task: str = "add", layer: int = 1, site: str = "resid_post", positions="all", *,
                        config: ModularConfig | None = None, cache_dir=None, progress: bool = True,
                        **reader_kw) -> CachedActivations:
    """Activations of the embedded model over all its prompts, as a :class:`saejax.data.Source`.

    Trains (or loads) the model, extracts ``(layer, site)`` through :func:`saejax.activations.extract`
    like any Hugging Face model, caches them, and returns the reader. ``positions``: ``"all"``
    (default), ``"last"`` (the ``=`` token) or a tuple of prompt positions. ``site`` may also be a
    TransformerLens name such as ``"blocks.1.hook_resid_post"`` (then ``layer`` is ignored).
    """
    from saejax.activations import ExtractSpec, TokenIds, extract_one

    cfg = config or default_config(task)
    path, _ = load_or_train(task, config=cfg, cache_dir=cache_dir, progress=progress)
    ids = prompts(cfg.task, cfg.p)["ids"][shuffled_prompts(cfg)]
    spec = ExtractSpec(str(path), TokenIds(ids, name=f"modular-{cfg.task}-p{cfg.p}"), layers=(layer,), sites=(site,),
                       n_tokens=None, drop_bos=False, positions=_positions(positions, ids.shape[1]), batch_size=4096)
    return extract_one(spec, cache_dir=cache_dir, progress=progress, **reader_kw)


def row_labels(source: CachedActivations, task: str = "add", *, config: ModularConfig | None = None) -> dict:
    """Per-row labels of a :func:`modular_activations` reader: ``prompt`` (canonical index),
    ``position``, ``a``, ``b``, ``op``, ``answer``; rows ``[n_tokens:]`` are the held-out ones."""
    cfg = config or default_config(task)
    tokens, mask = source.extra("tokens"), source.extra("mask")
    ctx, pos = np.nonzero(mask)  # row order: contexts in order, positions ascending
    data = prompts(cfg.task, cfg.p)
    prompt = shuffled_prompts(cfg)[ctx]
    check(np.array_equal(data["ids"][prompt], tokens[ctx]), "cache rows do not match the modular prompts of this config")
    return {"prompt": prompt, "position": pos, **{k: data[k][prompt] for k in ("a", "b", "op", "answer")}}
