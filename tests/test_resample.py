"""Dead-latent resampling (saejax.resample), the L1 variants and the sparsity warm-up, and recipes."""

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import ArraySource, ConfigError, SAEConfig, TrainConfig, archs, resample, step
from saejax.data import SourcePlan
from saejax.experiment import Experiment, Recipe, Synthetic
from saejax.train import evaluate, train


def planted(n=24000, d=32, n_features=512, p=0.01, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n_features, d))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    z = (rng.random((n, n_features)) < p) * rng.exponential(1.0, (n, n_features))
    return (z @ f).astype(np.float32)


@cache
def ensemble_and_alone(arch):
    x = planted(n=4096, d=8, n_features=32, p=0.1)
    cfg = SAEConfig(d_in=8, d_sae=64, arch=arch, l1_coef=1.0, jump_init_threshold=0.5, dead_tokens=256)
    tc = TrainConfig(batch_size=64, steps=90, lr=1e-2, log_every=10, chunk_steps=40, resample_steps=(30, 60, 80))
    return train(cfg, tc, ArraySource(x), [3, 0, 5], progress=False), train(cfg, tc, ArraySource(x), [0], progress=False)


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_member_resamples_as_it_would_alone(arch):
    both, alone = ensemble_and_alone(arch)
    assert both.resampled.shape == (3, 3) and alone.resampled.shape == (1, 3)
    assert both.resampled.sum() > 0, "the setup must kill latents for this test to mean anything"
    np.testing.assert_array_equal(both.resampled[1], alone.resampled[0])
    for name in alone.params:
        np.testing.assert_allclose(both.params[name][1], alone.params[name][0], rtol=1e-5, atol=1e-5, err_msg=name)


def _state(cfg, tc, dead, seed=0):
    st = step.init_state(cfg, tc, jax.random.PRNGKey(seed), jnp.zeros(cfg.d_in))
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in st.params.items()}
    opt = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype) if a.ndim else a, st.opt)
    return st.replace(params=params, opt=opt, since_fired=jnp.where(dead, cfg.dead_tokens, 3).astype(jnp.int32))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_resample_resets_exactly_the_dead_latents(arch):
    cfg = SAEConfig(d_in=6, d_sae=20, arch=arch, dead_tokens=100)
    tc = TrainConfig(steps=10, resample_steps=(5,), resample_scale=0.2)
    dead = np.zeros(20, bool)
    dead[[1, 4, 5, 11, 19]] = True
    st = _state(cfg, tc, jnp.asarray(dead))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 6)), jnp.float32)
    new, n = resample.resample(cfg, tc, st, x, jax.random.PRNGKey(7))
    assert int(n) == 5
    p0, p1 = st.params, new.params
    for name in p0:  # live latents and b_dec untouched
        ax = resample.latent_axis(name)
        keep = np.asarray(p0[name]) if ax is None else np.take(np.asarray(p0[name]), np.flatnonzero(~dead), axis=ax)
        got = np.asarray(p1[name]) if ax is None else np.take(np.asarray(p1[name]), np.flatnonzero(~dead), axis=ax)
        np.testing.assert_array_equal(got, keep, err_msg=name)
    w_dec, w_enc = np.asarray(p1["W_dec"])[dead], np.asarray(p1["W_enc"])[:, dead].T
    xs = np.asarray(x)
    rows = [int(np.argmax(np.abs(xs / np.linalg.norm(xs, axis=1, keepdims=True) @ w))) for w in w_dec]
    assert len(set(rows)) == 5, "draws are without replacement"
    np.testing.assert_allclose(w_dec, xs[rows] / np.linalg.norm(xs[rows], axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    alive_norm = np.linalg.norm(np.asarray(p0["W_enc"])[:, ~dead], axis=0).mean()
    np.testing.assert_allclose(w_enc, 0.2 * alive_norm * w_dec, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p1["b_enc"])[dead], 0.0)
    for name, init in archs.get(arch).extra_params(cfg).items():
        np.testing.assert_array_equal(np.asarray(p1[name])[dead], np.asarray(init)[dead])
    adam = [s for s in jax.tree.leaves(new.opt, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")][0]
    adam0 = [s for s in jax.tree.leaves(st.opt, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")][0]
    for moment, before in ((adam.mu, adam0.mu), (adam.nu, adam0.nu)):
        np.testing.assert_array_equal(np.asarray(moment["W_dec"])[dead], 0.0)
        np.testing.assert_array_equal(np.asarray(moment["W_enc"])[:, dead], 0.0)
        np.testing.assert_array_equal(np.asarray(moment["W_dec"])[~dead], np.asarray(before["W_dec"])[~dead])
    assert np.all(np.asarray(new.since_fired)[dead] == 0)


def test_resampling_prefers_badly_reconstructed_inputs():
    """Rows are drawn with probability proportional to loss**2: one row with 100x the loss of the
    others (10^4 x the weight) is the first draw in nearly every key."""
    cfg = SAEConfig(d_in=6, d_sae=8, arch="relu", dead_tokens=100)
    tc = TrainConfig(steps=10, resample_steps=(5,))
    dead = np.zeros(8, bool)
    dead[2] = True
    st = _state(cfg, tc, jnp.asarray(dead))
    st = st.replace(params={**st.params, "W_enc": st.params["W_enc"] * 0, "b_enc": st.params["b_enc"] * 0})  # x_hat = b_dec
    x = np.random.default_rng(2).normal(size=(64, 6)).astype(np.float32)
    x[17] *= 10.0  # loss ||x - b_dec||^2 about 100x the others'
    picks = []
    for key in range(50):
        new, _ = resample.resample(cfg, tc, st, jnp.asarray(x), jax.random.PRNGKey(key))
        picks.append(int(np.argmax(np.abs(x @ np.asarray(new.params["W_dec"][2])))))
    assert picks.count(17) >= 45


def test_resampling_revives_an_l1_dictionary_that_lost_half_its_latents():
    """An L1 setup that kills latents (lr 3e-2 decaying linearly, coefficient 0.3, 256 latents for
    128 planted features): half the latents die without resampling. With events after steps 300,
    600 and 900 the held-out dead fraction at the end falls by half and the held-out reconstruction
    improves. (Most resampled latents die again before the next event: the recipe revives, the
    L1 pressure decides who stays.)"""
    x = planted(n=24000, d=64, n_features=128, p=0.03)
    src, held = ArraySource(x[:20000]), x[20000:]
    cfg = SAEConfig(d_in=64, d_sae=256, arch="relu", l1_coef=0.3, dead_tokens=8192)
    out = {}
    for name, rs in (("off", ()), ("on", (300, 600, 900))):
        tc = TrainConfig(batch_size=512, steps=1200, lr=3e-2, decay="linear", resample_steps=rs, log_every=100)
        r = train(cfg, tc, src, [0], progress=False)
        out[name] = (r, evaluate(r, held))
    (r_off, off), (r_on, on) = out["off"], out["on"]
    assert r_off.history["dead_frac"][0, -1] > 0.45  # dead in training without resampling
    assert np.all(r_on.resampled > 100)  # each event found and resampled them
    assert float(on["dead_frac"][0]) < 0.6 * float(off["dead_frac"][0])
    assert float(on["fvu"][0]) < float(off["fvu"][0])


def test_sparsity_ramp_matches_saelens_and_dictionary_learning():
    tc = TrainConfig(steps=10, sparsity_warmup_steps=4)
    got = [float(step.sparsity_ramp(tc, jnp.asarray(s))) for s in range(6)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # min(1, step / W): 0 at the first step
    assert step.sparsity_ramp(TrainConfig(steps=10), jnp.asarray(0)) == 1.0


def test_l1_variants():
    rng = np.random.default_rng(0)
    cfg = SAEConfig(d_in=5, d_sae=7, arch="relu", unit_norm_decoder=False)
    params = {"W_dec": jnp.asarray(rng.normal(size=(7, 5)) * 3, jnp.float32)}
    pre = jnp.asarray(rng.normal(size=(9, 7)), jnp.float32)
    hp = {"l1_coef": jnp.float32(0.5)}
    z = np.maximum(np.asarray(pre), 0)
    _, weighted, _ = archs.get("relu").train_latents(cfg, params, pre, hp, 1.0)
    _, plain, _ = archs.get("relu").train_latents(cfg.replace(l1_decoder_norm=False), params, pre, hp, 1.0)
    norms = np.linalg.norm(np.asarray(params["W_dec"]), axis=1)
    np.testing.assert_allclose(float(weighted), 0.5 * np.mean(z @ norms), rtol=1e-6)
    np.testing.assert_allclose(float(plain), 0.5 * np.mean(z.sum(1)), rtol=1e-6)


@pytest.mark.parametrize("bad, msg", [({"resample_steps": (0, 5)}, "increasing positive"),
                                      ({"resample_steps": (5, 3)}, "increasing positive"),
                                      ({"resample_scale": 0.0}, "resample_scale must be positive")])
def test_bad_resampling_options(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(steps=10, **bad)


def test_recipes_name_cells_and_merge_options():
    exp = Experiment(name="r", source=Synthetic(), widths=(32,), ks=(4,), epochs=None, steps=(50,), seeds=(0, 1),
                     sae={"dead_tokens": 1000}, train={"batch_size": 64},
                     recipes=(Recipe("relu", "relu"), Recipe("relu+resample", "relu", train={"resample_steps": (20,)}),
                              Recipe("topk", "topk", sae={"aux_k": 0})))
    plan = exp.plan(SourcePlan(d_in=8, n_tokens=5000))
    ids = [u.id for u in plan.units]
    assert ids == ["relu-w32-len50", "relu+resample-w32-len50", "topk-w32-k4-len50"]
    assert [u.train.resample_steps for u in plan.units] == [(), (20,), ()]
    assert [u.sae.aux_k for u in plan.units] == [None, None, 0] and all(u.sae.dead_tokens == 1000 for u in plan.units)
    assert [u.recipe for u in plan.units] == ["relu", "relu+resample", "topk"]
    with pytest.raises(ConfigError, match="unknown SAE architecture 'relux'"):
        Recipe("x", "relux")
    with pytest.raises(ConfigError, match="recipe names must be unique"):
        Experiment(name="r", recipes=(Recipe("a", "relu"), Recipe("a", "topk")))
    with pytest.raises(ConfigError, match="recipe b: unknown train option 'resample'"):
        Experiment(name="r", recipes=(Recipe("b", "relu", train={"resample": 3}),))
