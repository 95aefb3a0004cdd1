"""AuxK from the shared dead set (at most n_aux dead) = the per-token AuxK, in value and gradient,
for every TopK-family architecture and both kernels, alone, vmapped, and over a whole training run."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import ArraySource, SAEConfig, TrainConfig, sae
from saejax import step as step_mod
from saejax.train import train

HP = {"lr": 1e-3, "l1_coef": 0.0, "l0_coef": 0.0, "aux_coef": 1 / 32}
D_IN, D_SAE, N_AUX = 24, 96, 12
CASES = [("topk", "dense"), ("topk", "sparse"), ("batchtopk", "dense"), ("matryoshka", "dense")]


def rel_err(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def problem(arch, kernel, seed=0):
    """Parameters away from the tied initialisation, non-zero biases, and a batch."""
    rng = np.random.default_rng(seed)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, aux_k=N_AUX, arch=arch, kernel=kernel)
    p = sae.init(cfg, jax.random.PRNGKey(seed), jnp.asarray(0.1 * rng.standard_normal(D_IN), jnp.float32))
    p["W_enc"] = p["W_enc"] + 0.2 * jnp.asarray(rng.standard_normal((D_IN, D_SAE)), jnp.float32)
    p["b_enc"] = jnp.asarray(0.1 * rng.standard_normal(D_SAE), jnp.float32)
    x = jnp.asarray(rng.standard_normal((300, D_IN)), jnp.float32)
    return cfg, p, x, rng


def dead_mask(rng, n_dead):
    return jnp.zeros(D_SAE, bool).at[rng.permutation(D_SAE)[:n_dead]].set(True)


@pytest.mark.parametrize("arch,kernel", CASES)
def test_shared_equals_per_token(arch, kernel):
    """Loss, AuxK, and the gradients of both w.r.t. every parameter, at 0, 1, 5 and n_aux dead
    latents and a fresh random instance."""
    cfg, p, x, rng = problem(arch, kernel)

    def both(p_, x_, mask):
        out = {}
        for name, dead in (("per_token", mask), ("shared", sae.dead_set(mask, N_AUX))):
            (loss, (metrics, _, _)), grads = jax.value_and_grad(partial(sae.loss, cfg), has_aux=True)(p_, x_, HP, dead, 1.0)
            aux_grads = jax.grad(lambda q, dead=dead: sae.loss(cfg, q, x_, HP, dead, 1.0)[1][0]["aux"])(p_)
            out[name] = (loss, metrics["aux"], grads, aux_grads)
        return out

    fn = jax.jit(both)
    for n_dead in (0, 1, 5, N_AUX, "random"):
        if n_dead == "random":
            _, p, x, rng = problem(arch, kernel, seed=7)
            n_dead = int(rng.integers(1, N_AUX + 1))
        out = fn(p, x, dead_mask(rng, n_dead))
        (l_ref, a_ref, g_ref, ga_ref), (l_new, a_new, g_new, ga_new) = out["per_token"], out["shared"]
        np.testing.assert_allclose(l_new, l_ref, rtol=1e-6)
        np.testing.assert_allclose(a_new, a_ref, rtol=1e-5, atol=1e-9)
        assert (float(a_ref) > 0) == (n_dead > 0)  # AuxK really contributes
        for name in g_ref:
            assert rel_err(g_new[name], g_ref[name]) < 1e-5, (n_dead, name, rel_err(g_new[name], g_ref[name]))
            if n_dead:  # AuxK's own gradient, not drowned by the reconstruction's
                assert rel_err(ga_new[name], ga_ref[name]) < 1e-5, (n_dead, name, rel_err(ga_new[name], ga_ref[name]))
            else:
                assert float(jnp.max(jnp.abs(ga_new[name]))) == 0.0
        if n_dead:
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                assert float(jnp.max(jnp.abs(ga_ref[name]))) > 0, (n_dead, name)


def test_dead_set():
    dead = jnp.zeros(D_SAE, bool).at[jnp.array([3, 40, 95])].set(True)
    ds = sae.dead_set(dead, 5)
    np.testing.assert_array_equal(ds.idx[:3], [3, 40, 95])
    np.testing.assert_array_equal(ds.valid, [True, True, True, False, False])


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_vmapped_branches_equal_per_token(kernel):
    """Members with 0, few and more than n_aux dead latents, through the branch of
    ``_loss_and_grads`` (shared when every member has at most n_aux dead) = each alone, per token."""
    cfg, p, x, rng = problem("topk", kernel)
    params = jax.tree.map(lambda a: jnp.stack([a, a * 1.01, a * 0.99]), p)
    tc = TrainConfig(steps=1)
    fn = jax.jit(jax.vmap(lambda p_, dd: step_mod._loss_and_grads(cfg, tc, p_, x, HP, dd, 1.0, "m"), axis_name="m"))
    ref = jax.jit(jax.value_and_grad(partial(sae.loss, cfg), has_aux=True))
    for counts in ((0, 3, N_AUX), (0, 0, 1), (2, N_AUX + 5, 0)):
        dead = jnp.stack([dead_mask(rng, c) for c in counts])
        (loss, (metrics, _, _)), grads = fn(params, dead)
        for m in range(3):
            one = jax.tree.map(lambda a, m=m: a[m], params)
            (l1, (m1, _, _)), g1 = ref(one, x, HP, dead[m], 1.0)
            np.testing.assert_allclose(loss[m], l1, rtol=1e-6)
            np.testing.assert_allclose(metrics["aux"][m], m1["aux"], rtol=1e-5, atol=1e-9)
            assert rel_err(jax.tree.map(lambda a, m=m: a[m], grads), g1) < 1e-5


@pytest.fixture
def per_token_auxk(monkeypatch):
    """Trains with the shared path off (then the default again): recompiles the chunk programs."""
    def run(fn, *args, **kw):
        monkeypatch.setattr(step_mod, "SHARED_AUXK", False)
        step_mod.chunk_program.cache_clear()
        try:
            return fn(*args, **kw)
        finally:
            monkeypatch.setattr(step_mod, "SHARED_AUXK", True)
            step_mod.chunk_program.cache_clear()
    return run


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_training_equals_per_token(kernel, per_token_auxk):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((20000, 16)) * np.linspace(2, 0.1, 16)).astype(np.float32)
    cfg = SAEConfig(d_in=16, d_sae=64, k=4, dead_tokens=256, kernel=kernel)  # n_aux = 8; latents die
    tc = TrainConfig(batch_size=64, steps=300, lr=3e-3, log_every=1, chunk_steps=100)
    seeds = [0, 1, 2]
    fast = train(cfg, tc, ArraySource(x), seeds, progress=False)
    slow = per_token_auxk(train, cfg, tc, ArraySource(x), seeds, progress=False)
    # both branches ran: steps where every member had 1..n_aux dead, and steps where one had more
    most_dead = np.round(fast.history["dead_frac"] * cfg.d_sae).max(0)
    assert np.sum((most_dead > 0) & (most_dead <= cfg.n_aux)) > 50 and np.sum(most_dead > cfg.n_aux) > 0
    assert np.max(fast.history["aux"]) > 0
    assert rel_err(fast.params, slow.params) < 1e-5, rel_err(fast.params, slow.params)
    np.testing.assert_allclose(fast.history["loss"], slow.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(fast.history["aux"], slow.history["aux"], rtol=1e-5, atol=1e-7)
