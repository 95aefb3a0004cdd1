"""Sparse kernels of the TopK family (TopK, BatchTopK, Matryoshka) = the dense computation (values
and gradients), training with them = dense training, the AuxK skip changes nothing, and memory-driven
seed groups = one group."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import SAEConfig, SyntheticSource, TrainConfig, kernels, kernels_batch, sae
from saejax import memory as memory_mod
from saejax import step as step_mod
from saejax import train as train_mod
from saejax.train import train

HP = {"lr": 1e-3, "l1_coef": 0.0, "l0_coef": 0.0, "aux_coef": 1 / 32}


def rel_err(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def random_problem(d_in=24, d_sae=96, n=300, seed=0):
    """Parameters away from the tied initialisation, non-zero biases, and a batch."""
    rng = np.random.default_rng(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=5, aux_k=12)
    p = sae.init(cfg, jax.random.PRNGKey(seed), jnp.asarray(0.1 * rng.standard_normal(d_in), jnp.float32))
    p["W_enc"] = p["W_enc"] + 0.2 * jnp.asarray(rng.standard_normal((d_in, d_sae)), jnp.float32)
    p["b_enc"] = jnp.asarray(0.1 * rng.standard_normal(d_sae), jnp.float32)
    x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
    return cfg, p, x, rng


@pytest.fixture
def small_chunks(monkeypatch):
    """Several gather/scatter and encoder chunks, the last one padded (300 = 4 x 64 + 44)."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 64 * 12 * 24 * 4)
    monkeypatch.setattr(kernels, "ENCODE_CHUNK", 128)


SPARSE_ARCHS = ["topk", "batchtopk", "matryoshka"]


@pytest.mark.parametrize("arch", SPARSE_ARCHS)
@pytest.mark.parametrize("case", ["some_dead", "none_dead", "all_dead", "aux_off"])
def test_sparse_loss_equals_dense_values_and_gradients(case, arch, small_chunks):
    cfg, p, x, rng = random_problem()
    cfg = cfg.replace(arch=arch, matryoshka_prefixes=(10, 40, 96))
    dead = {"some_dead": rng.random(96) < 0.3, "none_dead": np.zeros(96, bool), "all_dead": np.ones(96, bool),
            "aux_off": rng.random(96) < 0.3}[case]
    if case == "aux_off":
        cfg = cfg.replace(aux_k=0)
    outs = {}
    for kernel in ("dense", "sparse"):
        fn = jax.jit(jax.value_and_grad(partial(sae.loss, cfg.replace(kernel=kernel)), has_aux=True))
        outs[kernel] = fn(p, x, HP, jnp.asarray(dead), 1.0)
    (l_d, (m_d, f_d, k_d)), g_d = outs["dense"]
    (l_s, (m_s, f_s, k_s)), g_s = outs["sparse"]
    np.testing.assert_allclose(l_s, l_d, rtol=1e-6)
    np.testing.assert_allclose(k_s, k_d, rtol=1e-6)  # BatchTopK's smallest kept value (its threshold)
    for name in m_d:
        np.testing.assert_allclose(m_s[name], m_d[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(f_s, f_d)
    if case in ("some_dead", "all_dead"):
        assert float(m_d["aux"]) > 0  # AuxK really contributes
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert float(jnp.max(jnp.abs(g_d[name]))) > 0, name
        assert rel_err(g_s[name], g_d[name]) < 1e-5, (name, rel_err(g_s[name], g_d[name]))


def test_sparse_topk_on_wide_rows_equals_dense():
    """At d_sae >= 256 k the encoder's top-k takes the block-maxima route of ``top_k_rows``: the
    same loss and gradients as the dense path's ``lax.top_k``, with and without AuxK picks."""
    cfg, p, x, rng = random_problem(d_sae=2048, n=64)
    cfg = cfg.replace(k=4, aux_k=12)
    dead = jnp.asarray(rng.random(2048) < 0.3)
    outs = [jax.jit(jax.value_and_grad(partial(sae.loss, cfg.replace(kernel=kern)), has_aux=True))(p, x, HP, dead, 1.0)
            for kern in ("dense", "sparse")]
    (l_d, (m_d, f_d, _)), g_d = outs[0]
    (l_s, (m_s, f_s, _)), g_s = outs[1]
    np.testing.assert_allclose(l_s, l_d, rtol=1e-6)
    assert float(m_d["aux"]) > 0
    np.testing.assert_array_equal(f_s, f_d)
    assert rel_err(g_s, g_d) < 1e-5


def test_primitives_equal_dense_products(small_chunks):
    rng = np.random.default_rng(1)
    b, k, r, d = 300, 7, 50, 24
    v = jnp.asarray(rng.standard_normal((b, k)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, r, (b, k)), jnp.int32)  # repeats within and across tokens
    w = jnp.asarray(rng.standard_normal((r, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    dense_v = jnp.zeros((b, r)).at[jnp.arange(b)[:, None], idx].add(v)  # [B, R] with summed repeats
    np.testing.assert_allclose(kernels.gather_rows(v, idx, w), dense_v @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels.row_dots(idx, w, g), jnp.take_along_axis(g @ w.T, idx, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels.scatter_rows(v, idx, g, r), dense_v.T @ g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels.scatter_sum(v, idx, r), dense_v.sum(0), rtol=1e-5, atol=1e-5)


def test_entry_primitives_equal_dense_products_and_vmap_equals_each_member(small_chunks):
    """BatchTopK's entry kernels against dense ``[B, R]`` products (repeated entries summed), and
    vmapped over members (one stacked table on CPU) against each member alone."""
    rng = np.random.default_rng(2)
    s, e, b, r, d = 3, 1500, 300, 50, 24
    v = jnp.asarray(rng.standard_normal((s, e)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, b, (s, e)), jnp.int32)
    lat = jnp.asarray(rng.integers(0, r, (s, e)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((s, r, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((s, b, d)), jnp.float32)
    for m in range(s):
        z = jnp.zeros((b, r)).at[tok[m], lat[m]].add(v[m])  # the dense latents holding the entries
        np.testing.assert_allclose(kernels_batch.pair_scatter(v[m], lat[m], tok[m], w[m], b), z @ w[m], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kernels_batch.pair_scatter(v[m], tok[m], lat[m], g[m], r), z.T @ g[m], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kernels_batch.pair_dots(lat[m], w[m], tok[m], g[m]), (g[m] @ w[m].T)[tok[m], lat[m]],
                                   rtol=1e-5, atol=1e-5)
    one = [kernels_batch.decode_entries(v[m], tok[m], lat[m], w[m], b) for m in range(s)]
    many = jax.vmap(lambda *a: kernels_batch.decode_entries(*a, b))(v, tok, lat, w)
    np.testing.assert_allclose(many, jnp.stack(one), rtol=1e-6, atol=1e-6)
    shared_tok = jax.vmap(lambda v_, l_, w_: kernels_batch.pair_dots(l_, w_, tok[0], g[0]))(v, lat, w)  # unbatched args
    np.testing.assert_allclose(shared_tok, jnp.stack([kernels_batch.pair_dots(lat[m], w[m], tok[0], g[0]) for m in range(s)]),
                               rtol=1e-6, atol=1e-6)
    grads = jax.vmap(jax.grad(lambda v_, w_, t_, l_: jnp.sum(kernels_batch.decode_entries(v_, t_, l_, w_, b) ** 2),
                              argnums=(0, 1)))(v, w, tok, lat)
    for m in range(s):
        ref = jax.grad(lambda v_, w_: jnp.sum((jnp.zeros((b, r)).at[tok[m], lat[m]].add(v_) @ w_) ** 2), argnums=(0, 1))(v[m], w[m])
        assert rel_err([grads[0][m], grads[1][m]], ref) < 1e-5


def test_topk_encode_selection_and_input_gradient(small_chunks):
    cfg, p, x, rng = random_problem()
    dead = jnp.asarray(rng.random(96) < 0.3)
    vals, idx, avals, aidx = kernels.topk_encode(x, p["W_enc"], p["b_enc"], p["b_dec"], dead, 5, 12)
    pre = sae.pre_acts(p, x)
    ref_vals, ref_idx = sae.topk_select(pre, 5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-6, atol=1e-6)
    assert bool(jnp.all(dead[aidx] | (avals == 0)))  # AuxK picks dead latents only
    # d/dx of a function of the selected values equals the dense top-k's
    c = jnp.asarray(rng.standard_normal((300, 5)), jnp.float32)
    gx = jax.grad(lambda x_: jnp.sum(kernels.topk_encode(x_, p["W_enc"], p["b_enc"], p["b_dec"], dead, 5, 0)[0] * c))(x)
    gx_ref = jax.grad(lambda x_: jnp.sum(sae.topk_select(sae.pre_acts(p, x_), 5)[0] * c))(x)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_backward_does_no_dense_matmul(arch):
    """Compiled FLOPs of the sparse step stay near the encoder forward (dense: ~4x more)."""
    d, n, b = 64, 2048, 256
    cfg = SAEConfig(d_in=d, d_sae=n, k=8, aux_k=0, arch=arch)
    p = sae.init(cfg, jax.random.PRNGKey(0), jnp.zeros(d))
    x = jnp.ones((b, d))
    flops = {}
    for kernel in ("dense", "sparse"):
        f = jax.jit(jax.grad(lambda p_, c=cfg.replace(kernel=kernel): sae.loss(c, p_, x, HP, jnp.zeros(n, bool), 1.0)[0]))
        cost = f.lower(p).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if not cost or "flops" not in cost:
            pytest.skip("this backend reports no FLOP count")
        flops[kernel] = cost["flops"]
    forward = 2 * b * d * n
    assert flops["sparse"] < 1.5 * forward, flops
    assert flops["dense"] > 3 * forward, flops


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_skip_is_exact(arch):
    """Members with and without dead latents, vmapped with the shared skip predicate = each alone."""
    cfg, p, x, rng = random_problem()
    cfg = cfg.replace(arch=arch)
    params = jax.tree.map(lambda a: jnp.stack([a, a * 1.01, a * 0.99]), p)
    tc = TrainConfig(steps=1)
    for kernel in ("dense", "sparse"):
        c = cfg.replace(kernel=kernel)
        fn = jax.jit(jax.vmap(lambda p_, dd: step_mod._loss_and_grads(c, tc, p_, x, HP, dd, 1.0, "m"), axis_name="m"))
        ref = jax.jit(jax.value_and_grad(partial(sae.loss, c), has_aux=True))
        for dead in (np.stack([np.zeros(96, bool), rng.random(96) < 0.3, np.zeros(96, bool)]), np.zeros((3, 96), bool)):
            (loss, (metrics, _, _)), grads = fn(params, jnp.asarray(dead))
            for m in range(3):
                one = jax.tree.map(lambda a: a[m], params)
                (l1, (m1, _, _)), g1 = ref(one, x, HP, jnp.asarray(dead[m]), 1.0)
                np.testing.assert_allclose(loss[m], l1, rtol=1e-6)
                np.testing.assert_allclose(metrics["aux"][m], m1["aux"], rtol=1e-6, atol=1e-9)
                assert rel_err(jax.tree.map(lambda a: a[m], grads), g1) < 1e-5


SRC = SyntheticSource(d=16, n_features=40, s=3, n_heldout=1024)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_training_matches_dense(arch):
    # latents die, so AuxK runs (BatchTopK keeps more latents alive: a shorter dead window)
    cfg = SAEConfig(d_in=16, d_sae=48, k=3, aux_k=6, dead_tokens=1024 if arch == "topk" else 256, arch=arch)
    tc = TrainConfig(batch_size=128, steps=150, lr=3e-3, log_every=10, chunk_steps=50)
    dense = train(cfg, tc, SRC, [0, 1, 2], progress=False)
    sparse = train(cfg.replace(kernel="sparse"), tc, SRC, [0, 1, 2], progress=False)
    assert np.max(dense.history["aux"]) > 0
    assert rel_err(sparse.params, dense.params) < 1e-4, rel_err(sparse.params, dense.params)
    np.testing.assert_allclose(sparse.history["loss"], dense.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(sparse.history["dead_frac"], dense.history["dead_frac"], atol=1e-6)
    if arch == "batchtopk":  # the inference threshold tracked from the smallest kept values
        np.testing.assert_allclose(sparse.threshold, dense.threshold, rtol=1e-4)


def test_member_bytes_bounds_compiled_memory():
    """The pre-compile estimate is at least XLA's own per-member figure, for every architecture."""
    tc = TrainConfig(batch_size=512, steps=10, log_every=2, chunk_steps=2)
    for arch, kernel in [("topk", "dense"), ("topk", "sparse"), ("batchtopk", "dense"), ("batchtopk", "sparse"),
                         ("matryoshka", "sparse"), ("relu", "dense"), ("jumprelu", "dense")]:
        cfg = SAEConfig(d_in=64, d_sae=1024, k=8, arch=arch, kernel=kernel)
        used = []
        for m in (1, 2):
            prog = train_mod.chunk_program(cfg, train_mod.program_key(tc), True)
            st = jax.eval_shape(lambda m=m: jax.vmap(partial(train_mod.init_state, cfg, tc), in_axes=(0, None))(
                jnp.zeros((m, 2), jnp.uint32), jnp.zeros(64)))
            hp = {k: jax.ShapeDtypeStruct((m,), jnp.float32) for k in HP}
            mem = prog.lower(st, jax.ShapeDtypeStruct((2, 512, 64), jnp.float32), jax.ShapeDtypeStruct((2,), bool),
                             hp, jax.ShapeDtypeStruct((), jnp.float32),
                             jax.ShapeDtypeStruct((), jnp.int32)).compile().memory_analysis()
            if mem is None:
                pytest.skip("this backend reports no memory analysis")
            used.append(mem.temp_size_in_bytes + mem.argument_size_in_bytes)
        per_member = used[1] - used[0]
        est = train_mod.member_bytes(cfg, tc)
        assert per_member <= est <= 4 * per_member + 2 * kernels.CHUNK_BYTES, (arch, kernel, per_member, est)


def test_auto_groups_fewest_that_fit(monkeypatch, capsys):
    cfg = SAEConfig(d_in=16, d_sae=32, k=3, kernel="sparse")
    tc = TrainConfig(batch_size=64, steps=10)
    per = train_mod.member_bytes(cfg, tc)
    data = 2 * min(tc.chunk_bytes, tc.chunk_steps * 64 * 16 * 4)
    monkeypatch.setattr(memory_mod, "memory_budget", lambda: (data + 2 * per + per // 2, "test budget"))
    assert train_mod.auto_group_size(cfg, tc, 2) == 2 and capsys.readouterr().out == ""
    assert train_mod.auto_group_size(cfg, tc, 5) == 2  # 3 groups (2, 2, 1): the fewest that fit
    assert "3 groups of at most 2" in capsys.readouterr().out
    assert train_mod.auto_group_size(cfg, tc, 8) == 2  # 4 groups of 2
    monkeypatch.setattr(memory_mod, "memory_budget", lambda: (1, "test budget"))
    assert train_mod.auto_group_size(cfg, tc, 3) == 1  # nothing fits: one at a time


def test_auto_split_equals_one_group(monkeypatch, capsys):
    """A memory budget for two members splits four seeds into two groups: same parameters.
    (An explicit ``max_group`` is tested in test_train.py.)"""
    cfg = SAEConfig(d_in=16, d_sae=32, k=3, kernel="sparse", dead_tokens=128)  # dead after a silent step
    tc = TrainConfig(batch_size=128, steps=60, lr=3e-3, log_every=10)
    seeds = [0, 1, 2, 3]
    one = train(cfg, tc, SRC, seeds, progress=False)
    assert "groups" not in capsys.readouterr().out
    per = train_mod.member_bytes(cfg, tc)
    monkeypatch.setattr(memory_mod, "memory_budget", lambda: (2 * min(tc.chunk_bytes, tc.chunk_steps * 128 * 16 * 4) + 2 * per, "test budget"))
    split = train(cfg, tc, SRC, seeds, progress=False)
    assert "2 groups of at most 2" in capsys.readouterr().out
    assert rel_err(split.params, one.params) <= 1e-6
    np.testing.assert_allclose(split.history["loss"], one.history["loss"], rtol=1e-6)
    assert np.max(one.history["aux"]) > 0  # AuxK ran, in some groups earlier than in others


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_auto_kernel_is_the_measured_choice_and_equals_dense(arch):
    """``kernel="auto"`` (the default) picks sparse on the CPU for the TopK family at d_sae >= 8k,
    dense where the sparse kernel lost or does not exist, and gives the dense path's loss and gradients."""
    cfg, p, x, rng = random_problem()  # d_sae 96, k 5: ratio 19.2
    cfg = cfg.replace(arch=arch)
    assert SAEConfig(d_in=8, d_sae=32, k=4).kernel == "auto"
    assert kernels.resolve(cfg) == "sparse"
    assert kernels.resolve(cfg.replace(arch="relu")) == "dense"  # no sparse step
    assert kernels.resolve(cfg.replace(k=13)) == "dense"  # 96 < 8 x 13: the dense kernel won there
    assert kernels.resolve(cfg.replace(kernel="dense")) == "dense"
    dead = jnp.asarray(rng.random(96) < 0.3)
    outs = {}
    for kernel in ("dense", "auto"):
        fn = jax.jit(jax.value_and_grad(partial(sae.loss, cfg.replace(kernel=kernel)), has_aux=True))
        outs[kernel] = fn(p, x, HP, dead, 1.0)
    (l_d, _), g_d = outs["dense"]
    (l_a, _), g_a = outs["auto"]
    np.testing.assert_allclose(l_a, l_d, rtol=1e-6)
    assert rel_err(g_a, g_d) < 1e-5
