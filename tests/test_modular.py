"""The embedded modular-arithmetic model: trains to >= 99% held-out accuracy, loads from the cache,
and its activations go through the same extraction path into the SAE trainer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from saejax.errors import ConfigError  # noqa: E402
from saejax.models import modular as M  # noqa: E402

P = 113


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The default ``add`` model, trained once per session into a temporary cache."""
    root = tmp_path_factory.mktemp("saejax-cache")
    path, info = M.load_or_train("add", cache_dir=root, progress=False)
    return root, path, info


def test_default_model_reaches_99_percent_heldout_within_budget(trained):
    _, path, info = trained
    assert info["heldout_accuracy"] >= 0.99 and info["reached_target"]
    # The 3-minute wall-clock budget is a benchmark figure (README), not a timed test: here the
    # training must simply reach the target before its step limit.
    assert info["n_train"] + info["n_heldout"] == P * P
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_later_runs_load_the_saved_model_instead_of_training(trained, monkeypatch):
    root, path, info = trained

    def refuse(*a, **kw):
        raise AssertionError("retrained although the model is cached")

    monkeypatch.setattr(M, "train_modular", refuse)
    mm = M.modular_model("add", cache_dir=root, progress=False)
    assert mm.path == path
    held = mm.data["ids"][mm.heldout_idx], mm.data["answer"][mm.heldout_idx]
    assert M.accuracy(mm.model, *held, P) == pytest.approx(info["heldout_accuracy"])
    assert type(mm.model).__name__ == "GPT2LMHeadModel" and mm.model.config.n_layer == 2


def test_activations_feed_the_trainer_end_to_end(trained):
    root, path, _ = trained
    src = M.modular_activations("add", layer=1, site="resid_post", cache_dir=root, progress=False)
    assert (src.d_in, src.n_total) == (128, 3 * P * P)
    fp = src.manifest["fingerprint"]
    assert fp["dataset"]["kind"] == "tokens"  # the generic HF extraction path
    plan = M.plan_activations("add", layer=1, site="resid_post", cache_dir=root)  # from the config alone
    assert (plan.d_in, plan.n_tokens) == (src.d_in, src.n_tokens) and plan.lines[0] == "model: in the cache"
    labels = M.row_labels(src, "add")
    assert (labels["answer"] == (labels["a"] + labels["b"]) % P).all()
    assert np.bincount(labels["position"]).tolist() == [P * P] * 3
    held_prompts = set(labels["prompt"][src.n_tokens :].tolist())
    assert len(held_prompts) > 1000  # the held-out tail is spread over many prompts, not a corner of the table

    train = pytest.importorskip("saejax.train", reason="the SAE trainer (saejax.train) is not in this checkout")
    from saejax.config import SAEConfig, TrainConfig

    cfg = SAEConfig(d_in=128, d_sae=256, arch="topk", k=8)
    result = train.train(cfg, TrainConfig(batch_size=256, steps=40, log_every=10, chunk_steps=20), src, [0, 1],
                         progress=False)
    assert result.decoders().shape == (2, 256, 128)
    fvu = result.history["fvu"]
    assert np.isfinite(fvu).all() and (fvu[:, -1] < fvu[:, 0]).all()
    ev = train.evaluate(result, src.heldout())
    assert ev is not None


def test_last_position_and_hook_name_spellings(trained):
    root, _, _ = trained
    last = M.modular_activations("add", layer=0, site="mlp_out", positions="last", cache_dir=root, progress=False)
    assert last.n_total == P * P and (M.row_labels(last, "add")["position"] == 2).all()
    same = M.modular_activations("add", site="blocks.0.hook_mlp_out", positions=(2,), cache_dir=root, progress=False)
    assert same.path == last.path
    with pytest.raises(ConfigError, match="positions must be 'all', 'last'"):
        M.modular_activations("add", positions="first", cache_dir=root, progress=False)
    with pytest.raises(ConfigError, match="valid layers are 0..1"):
        M.modular_activations("add", layer=2, cache_dir=root, progress=False)


@pytest.mark.parametrize("task", M.TASKS)
def test_prompts_labels_and_split(task):
    d = M.prompts(task, P)
    n = P * P * (2 if task == "both" else 1)
    assert d["ids"].shape == (n, 4 if task == "both" else 3) and (d["ids"][:, -1] == P + 2).all()
    expect = np.where(d["op"] == 0, (d["a"] + d["b"]) % P, (d["a"] * d["b"]) % P)
    assert (d["answer"] == expect).all()
    if task == "both":
        assert set(np.unique(d["ids"][:, 1])) == {P, P + 1} and set(np.unique(d["op"])) == {0, 1}
    tr, te = M.split(M.default_config(task))
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == n
    assert len(tr) == round(M.default_config(task).train_frac * n)


def test_training_is_deterministic():
    cfg = replace(M.default_config("mul"), max_steps=3, eval_every=3, batch_size=64)
    a, info_a = M.train_modular(cfg, progress=False)
    b, info_b = M.train_modular(cfg, progress=False)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (x == y).all(), name
    assert info_a["heldout_accuracy"] == info_b["heldout_accuracy"] and info_a["steps"] == 3


def test_bad_modular_inputs():
    with pytest.raises(ConfigError, match="modular task must be one of add, mul, both, got 'sub'"):
        M.prompts("sub")
    with pytest.raises(ConfigError, match="train_frac must be in"):
        M.ModularConfig(train_frac=1.5)
