"""The CPU's host top-k (:func:`saejax.topk.host_top_k`): exactly ``lax.top_k`` (values, columns and
their order, ties too), under ``vmap``, ``jit`` and ``grad``, inside the encoder and through
training."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import SAEConfig, SyntheticSource, TrainConfig, sae, topk
from saejax import step as step_mod
from saejax.train import train

pytestmark = pytest.mark.skipif(topk.buffer_callback is None or jax.default_backend() != "cpu",
                                reason="the host path exists on a CPU backend with jax.experimental.buffer_callback")


@pytest.fixture
def host_everywhere(monkeypatch):
    """Every float32 top-k of at least 2 elements takes the host path; programs traced before are dropped."""
    monkeypatch.setattr(topk, "HOST_MIN_ELEMENTS", 2)
    step_mod.chunk_program.cache_clear()
    yield
    step_mod.chunk_program.cache_clear()


def tables(rng, rows, n):
    """Fresh normal rows; heavily tied small integers; mostly -inf (a masked AuxK table); all-equal rows."""
    masked = np.where(rng.random((rows, n)) < 0.97, -np.inf, rng.standard_normal((rows, n)))
    tied = rng.integers(0, 6, (rows, n)).astype(np.float32)
    tied[0] = 0.0
    tied[1, : n // 2] = 3.0
    return [rng.standard_normal((rows, n)), tied, masked]


@pytest.mark.parametrize("rows,n,k", [(300, 1024, 32), (7, 40, 5), (64, 333, 1), (5, 8, 8), (33, 5000, 16)])
def test_host_top_k_equals_lax_top_k(host_everywhere, rows, n, k):
    rng = np.random.default_rng(rows + n + k)
    for s in tables(rng, rows, n):
        s = jnp.asarray(s, jnp.float32)
        assert topk.use_host(s, k)
        v, i = jax.jit(partial(topk.host_top_k, k=k))(s)
        rv, ri = jax.lax.top_k(s, k)
        np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))  # the same columns in the same order
        np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
        if 1 < k and n < 256 * k:  # top_k_rows is this path there (the block route's ties: see top_k_rows)
            np.testing.assert_array_equal(np.asarray(topk.top_k_rows(s, k)[1]), np.asarray(ri))


@pytest.mark.parametrize("positive", [0.6, 0.01])
def test_host_top_k_of_a_flat_batch(host_everywhere, positive):
    """BatchTopK's one top-k over a whole batch's ReLU'd pre-activations (1-D, k = 32 B), with the
    k-th value positive, and with fewer positives than k so that zeros tie across the boundary."""
    rng = np.random.default_rng(6)
    flat = np.maximum(rng.standard_normal(300 * 256) + (rng.random(300 * 256) < positive) * 5 - 5, 0)
    s = jnp.asarray(flat, jnp.float32)
    v, i = jax.jit(partial(topk.top_k, k=32 * 300))(s)
    rv, ri = jax.lax.top_k(s, 32 * 300)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))


def test_host_top_k_under_vmap_and_grad(host_everywhere):
    """Vmapped (two nested axes) it equals each table alone; its values carry lax.top_k's gradient."""
    rng = np.random.default_rng(3)
    s = jnp.asarray(rng.standard_normal((2, 3, 50, 200)), jnp.float32)
    got = jax.jit(jax.vmap(jax.vmap(partial(topk.host_top_k, k=9))))(s)
    for a in range(2):
        for b in range(3):
            want = jax.lax.top_k(s[a, b], 9)
            np.testing.assert_array_equal(np.asarray(got[1][a, b]), np.asarray(want[1]))
            np.testing.assert_array_equal(np.asarray(got[0][a, b]), np.asarray(want[0]))
    w = jnp.asarray(rng.standard_normal(9), jnp.float32)
    g_host = jax.grad(lambda x: jnp.sum(topk.host_top_k(x, 9)[0] ** 2 * w))(s[0, 0])
    g_lax = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 9)[0] ** 2 * w))(s[0, 0])
    np.testing.assert_array_equal(np.asarray(g_host), np.asarray(g_lax))


def test_host_top_k_block_route_and_the_switches(monkeypatch, host_everywhere):
    """On wide rows the block-maxima route's inner top-ks go through the host and still equal lax.top_k;
    ``SAEJAX_HOST_TOPK=0``, bfloat16 and small tables stay in XLA."""
    rng = np.random.default_rng(4)
    s = jnp.asarray(rng.standard_normal((6, 16384)), jnp.float32)
    v, i = topk.top_k_rows(s, 32)
    rv, ri = jax.lax.top_k(s, 32)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
    assert "buffer_callback" in str(jax.make_jaxpr(lambda x: topk.top_k_rows(x, 32))(s))
    assert not topk.use_host(s.astype(jnp.bfloat16), 32)
    monkeypatch.setenv("SAEJAX_HOST_TOPK", "0")
    assert not topk.use_host(s, 32)
    monkeypatch.delenv("SAEJAX_HOST_TOPK")
    monkeypatch.setattr(topk, "HOST_MIN_ELEMENTS", s.size + 1)
    assert not topk.use_host(s, 32)


@pytest.mark.parametrize("arch,kernel", [("topk", "sparse"), ("batchtopk", "sparse"), ("batchtopk", "dense")])
def test_training_with_the_host_top_k_equals_xla(monkeypatch, arch, kernel):
    """Trained through the host top-k, the same parameters and metrics as with every top-k in XLA
    (the same columns in the same order, so the same sums), AuxK included."""
    cfg = SAEConfig(d_in=16, d_sae=256, k=4, arch=arch, kernel=kernel, dead_tokens=256)
    tc = TrainConfig(batch_size=128, steps=48, log_every=8, lr=3e-3)
    src = SyntheticSource(d=16, n_features=64, s=3, n_heldout=1024)
    out = {}
    for name, min_elements in (("host", 2), ("xla", 1 << 62)):
        monkeypatch.setattr(topk, "HOST_MIN_ELEMENTS", min_elements)
        step_mod.chunk_program.cache_clear()
        out[name] = train(cfg, tc, src, [0, 1, 2], progress=False)
    step_mod.chunk_program.cache_clear()
    for a, b in zip(jax.tree.leaves(out["host"].params), jax.tree.leaves(out["xla"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name, h in out["xla"].history.items():
        np.testing.assert_array_equal(out["host"].history[name], h, err_msg=name)
    assert np.all(out["xla"].history["loss"][:, -1] < out["xla"].history["loss"][:, 0])


def test_encoder_through_the_host_equals_dense(host_everywhere):
    """The sparse encoder with the host top-k (and AuxK's masked top-k): loss and gradients as the dense path."""
    rng = np.random.default_rng(5)
    cfg = SAEConfig(d_in=24, d_sae=512, k=8, aux_k=16)
    p = sae.init(cfg, jax.random.PRNGKey(0), jnp.zeros(24))
    p["W_enc"] = p["W_enc"] + 0.2 * jnp.asarray(rng.standard_normal((24, 512)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((200, 24)), jnp.float32)
    dead = jnp.asarray(rng.random(512) < 0.3)
    hp = {"lr": 1e-3, "l1_coef": 0.0, "l0_coef": 0.0, "aux_coef": 1 / 32}
    outs = [jax.jit(jax.value_and_grad(partial(sae.loss, cfg.replace(kernel=kern)), has_aux=True))(p, x, hp, dead, 1.0)
            for kern in ("dense", "sparse")]
    np.testing.assert_allclose(outs[1][0][0], outs[0][0][0], rtol=1e-6)
    np.testing.assert_array_equal(outs[1][0][1][1], outs[0][0][1][1])  # the fired latents
    for name in p:
        np.testing.assert_allclose(outs[1][1][name], outs[0][1][name], rtol=1e-4, atol=1e-6, err_msg=name)
