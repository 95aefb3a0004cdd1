"""The trainer: ensemble = alone, invariants of every architecture, recovery, no retrace, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import ArraySource, ConfigError, SAEConfig, SyntheticSource, TrainConfig, sae
from saejax import train as train_mod
from saejax.train import evaluate, train

ARCHS = ["topk", "batchtopk", "relu", "jumprelu"]
SRC = SyntheticSource(d=16, n_features=40, s=3, n_heldout=1024)


def cfg_for(arch, **kw):
    return SAEConfig(d_in=16, d_sae=32, arch=arch, k=3, l1_coef=3e-3, l0_coef=1e-3, dead_tokens=2048, **kw)


def rel_err(a, b):
    return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_in_ensemble_equals_seed_alone(arch):
    tc = TrainConfig(batch_size=128, steps=200, lr=3e-3, log_every=20, chunk_steps=60)
    seeds = [3, 11, 5, 7, 0, 1, 2, 9]
    many = train(cfg_for(arch), tc, SRC, seeds, progress=False)
    alone = train(cfg_for(arch), tc, SRC, [5], progress=False)
    one = jax.tree.map(lambda a: a[seeds.index(5)], many.params)
    assert rel_err(one, jax.tree.map(lambda a: a[0], alone.params)) <= 1e-5
    np.testing.assert_allclose(many.history["loss"][2], alone.history["loss"][0], rtol=1e-5)
    # and the seeds really differ from each other
    assert rel_err(jax.tree.map(lambda a: a[0], many.params), one) > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_invariants_and_loss_falls(arch):
    tc = TrainConfig(batch_size=256, steps=300, lr=3e-3, log_every=1, chunk_steps=100)
    r = train(cfg_for(arch), tc, SRC, [0, 1], progress=False)
    # decoder rows unit-norm after every single step
    assert np.max(r.history["dec_norm_err"]) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(r.params["W_dec"], axis=-1), 1.0, atol=1e-5)
    first, last = r.history["loss"][:, :20].mean(1), r.history["loss"][:, -20:].mean(1)
    assert np.all(last < 0.5 * first), (first, last)
    x = jnp.asarray(SRC.heldout()[:256] * r.scale)
    p0 = jax.tree.map(lambda a: a[0], r.params)
    if arch == "topk":
        z = sae.encode(r.sae_cfg, p0, x)
        pre = sae.pre_acts(p0, x)
        kth = jnp.sort(pre, axis=1)[:, -3]
        nnz = np.asarray(jnp.sum(z != 0, axis=1))
        assert np.all(nnz <= 3) and np.all(nnz[np.asarray(kth) > 0] == 3)
        assert np.mean(nnz == 3) > 0.99
    if arch == "batchtopk":
        z = sae.batchtopk_latents(sae.pre_acts(p0, x), 3)
        assert int(jnp.sum(z != 0)) == 3 * 256
        assert r.threshold[0] > 0  # inference threshold was estimated
        z_inf = sae.encode(r.sae_cfg, p0, x, jnp.float32(r.threshold[0]))
        assert 1.0 < float(jnp.mean(jnp.sum(z_inf > 0, axis=1))) < 6.0  # ~k per token on average


def test_topk_recovers_planted_dictionary():
    src = SyntheticSource(d=32, n_features=48, s=3, dictionary_seed=1)
    cfg = SAEConfig(d_in=32, d_sae=48, arch="topk", k=3, dead_tokens=4096, b_dec_init="zeros")
    tc = TrainConfig(batch_size=512, steps=3000, lr=2e-3, log_every=100, chunk_steps=500)
    r = train(cfg, tc, src, [0, 1, 2], progress=False)
    truth = src.true_dictionary
    for m in range(3):
        w = r.decoders()[m]
        cos = np.abs(truth @ w.T) / np.linalg.norm(w, axis=1)
        assert cos.max(1).mean() > 0.9, (m, cos.max(1).mean())


def test_no_retrace_between_chunks():
    cfg = cfg_for("topk", aux_k=4)
    tc = TrainConfig(batch_size=64, steps=95, log_every=5, chunk_steps=10)
    train_mod.TRACES.clear()
    r = train(cfg, tc, SRC, [0, 1], progress=False)
    assert sum(train_mod.TRACES.values()) == 1  # 10 chunks, the last one padded, one trace
    assert r.log_steps[-1] == 95 and r.history["loss"].shape == (2, 19)
    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        short = train(cfg, tc.replace(steps=15, decay="constant"), SRC, [0, 1], progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sum(train_mod.TRACES.values()) == 1  # another length traces nothing new
    assert compiles == []  # and XLA compiles nothing at all: init, chunks, evaluation all reused
    again = train(cfg, tc.replace(steps=15), SRC, [0, 1], progress=False)
    np.testing.assert_array_equal(short.params["W_dec"], again.params["W_dec"])


def test_length_is_traced_but_exact():
    """A traced length changes nothing: 30 steps of a linear decay over 30 equal the first 30
    steps' schedule, and stopping early at a chunk boundary equals a shorter run."""
    cfg = cfg_for("topk")
    tc = TrainConfig(batch_size=64, steps=30, log_every=5, chunk_steps=10, decay="linear", lr=3e-3)
    a = train(cfg, tc, SRC, [0], progress=False)
    b = train(cfg, tc.replace(chunk_steps=30), SRC, [0], progress=False)  # other chunking, same numbers
    np.testing.assert_allclose(a.params["W_dec"], b.params["W_dec"], atol=1e-6)


def test_sweep_axis_equals_separate_runs():
    cfg = cfg_for("relu")
    tc = TrainConfig(batch_size=128, steps=100, lr=1e-3, log_every=10)
    swept = train(cfg, tc, SRC, [0, 1], sweep={"lr": [1e-3, 3e-3], "l1_coef": [1e-3, 1e-2]}, progress=False)
    assert swept.n_members == 8
    h = 3  # lr=3e-3, l1=1e-2
    assert swept.sweep_points[h]["lr"] == 3e-3 and swept.sweep_points[h]["l1_coef"] == 1e-2
    alone = train(cfg.replace(l1_coef=1e-2), tc.replace(lr=3e-3), SRC, [0, 1], progress=False)
    assert rel_err(swept.select(h).params, alone.params) <= 1e-5


def test_groups_equal_one_program():
    cfg = cfg_for("topk")
    tc = TrainConfig(batch_size=128, steps=60, log_every=10)
    one = train(cfg, tc, SRC, [0, 1, 2, 3, 4], progress=False)
    split = train(cfg, tc, SRC, [0, 1, 2, 3, 4], progress=False, max_group=2)
    assert rel_err(split.params, one.params) <= 1e-6
    np.testing.assert_allclose(split.history["loss"], one.history["loss"], rtol=1e-6)


def test_own_data_order_per_seed():
    cfg = cfg_for("topk")
    tc = TrainConfig(batch_size=64, steps=40, log_every=10, same_data_order=False)
    both = train(cfg, tc, SRC, [0, 1], progress=False)
    alone = train(cfg, tc, SRC, [1], progress=False)
    assert rel_err(jax.tree.map(lambda a: a[1], both.params), jax.tree.map(lambda a: a[0], alone.params)) <= 1e-5
    swept = train(cfg, tc, SRC, [0, 1], sweep={"lr": [3e-4, 1e-3]}, progress=False)  # copies of a seed share its order
    lone = train(cfg, tc.replace(lr=1e-3), SRC, [1], progress=False)
    assert rel_err(jax.tree.map(lambda a: a[1], swept.select(1).params), jax.tree.map(lambda a: a[0], lone.params)) <= 1e-5
    shared = train(cfg, tc.replace(same_data_order=True), SRC, [0, 1], progress=False)
    assert rel_err(jax.tree.map(lambda a: a[1], shared.params), jax.tree.map(lambda a: a[1], both.params)) > 1e-3


class _NoTake:
    """A source with only ``batches()`` (a generator): the trainer's batch-by-batch path."""

    def __init__(self, src):
        self.src, self.d_in, self.n_tokens, self.true_dictionary = src, src.d_in, src.n_tokens, None

    def batches(self, batch_size, *, seed):
        return self.src.batches(batch_size, seed=seed)

    def heldout(self):
        return self.src.heldout()


def test_vectorised_batches_equal_the_batch_iterator():
    x = np.random.default_rng(3).standard_normal((500, 16)).astype(np.float32)  # 500 rows: epochs end mid-chunk
    cfg = cfg_for("topk")
    tc = TrainConfig(batch_size=64, steps=30, log_every=10, chunk_steps=20, same_data_order=False)
    fast = train(cfg, tc, ArraySource(x), [0, 1], progress=False)
    slow = train(cfg, tc, _NoTake(ArraySource(x)), [0, 1], progress=False)
    assert rel_err(fast.params, slow.params) == 0.0
    np.testing.assert_array_equal(fast.history["loss"], slow.history["loss"])


def test_nan_seed_is_reported_and_isolated(capsys):
    cfg = cfg_for("relu")
    tc = TrainConfig(batch_size=128, steps=50, lr=1e-3, log_every=10)
    r = train(cfg, tc, SRC, [0, 1], sweep={"lr": [1e-3, 1e38]}, progress=False)
    assert set(r.failed) == {2, 3} and all(0 <= s < 50 for s in r.failed.values())
    assert "non-finite or diverged" in capsys.readouterr().out
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(r.params))  # frozen at last finite step
    ok = train(cfg, tc, SRC, [0, 1], progress=False)
    assert rel_err(r.select(0).params, ok.params) <= 1e-6


def test_scale_folds_into_weights():
    x = SRC.heldout() * 7.0
    cfg = cfg_for("relu")
    r = train(cfg, TrainConfig(batch_size=128, steps=30), ArraySource(x), [0], progress=False)
    assert abs(np.mean(np.sum((x * r.scale) ** 2, 1)) - 1.0) < 1e-3
    p = jax.tree.map(lambda a: a[0], r.params)
    raw = jax.tree.map(lambda a: a[0], r.raw_params())
    z_norm = sae.encode(cfg, p, jnp.asarray(x * r.scale))
    z_raw = sae.encode(cfg, raw, jnp.asarray(x))
    np.testing.assert_allclose(z_raw, z_norm, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sae.decode(raw, z_raw), sae.decode(p, z_norm) / r.scale, rtol=1e-4, atol=1e-4)


def test_evaluate_reports_alive_and_fvu():
    cfg = cfg_for("topk")
    r = train(cfg, TrainConfig(batch_size=256, steps=200, lr=3e-3), SRC, [0, 1], progress=False)
    ev = evaluate(r, SRC.heldout(), keep_latents=True)
    assert ev["latents"].shape == (2, 1024, 32)
    np.testing.assert_array_equal(ev["alive"], (ev["latents"] > 0).any(1))
    np.testing.assert_allclose(ev["l0"], (ev["latents"] > 0).sum(2).mean(1), rtol=1e-6)
    assert np.all(ev["fvu"] < 0.5) and np.allclose(ev["ev"], 1 - ev["fvu"])


def test_geometric_median_beats_mean_under_outliers():
    x = np.random.default_rng(0).standard_normal((500, 4))
    x[:50] += 100.0
    gm = sae.geometric_median(x)
    assert np.linalg.norm(gm) < 1.0 < np.linalg.norm(x.mean(0))


@pytest.mark.parametrize("bad, match", [
    (dict(cfg=dict(d_in=16, d_sae=32, k=32)), "k must satisfy 0 < k < d_sae=32, got k=32"),
    (dict(cfg=dict(d_in=16, d_sae=32, k=0)), "got k=0"),
    (dict(cfg=dict(d_in=16, d_sae=32, arch="topkk")), "did you mean 'topk'"),
    (dict(cfg=dict(d_in=17, d_sae=32, k=3)), "d_in=16 but the SAE config says d_in=17"),
    (dict(seeds=[]), "seed list is empty"),
    (dict(seeds=[1, 2, 1]), r"duplicate seeds \[1\]"),
    (dict(sweep={"d_sae": [1, 2]}), "cannot sweep 'd_sae'"),
])
def test_bad_input_one_line_errors(bad, match):
    kw = dict(cfg=dict(d_in=16, d_sae=32, k=3), seeds=[0], sweep=None) | bad
    with pytest.raises(ConfigError, match=match) as e:
        train(SAEConfig(**kw["cfg"]), TrainConfig(batch_size=32, steps=5), SRC, kw["seeds"], sweep=kw["sweep"], progress=False)
    assert "\n" not in str(e.value)


def test_nan_in_data_is_refused():
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    x[17, 3] = np.nan
    with pytest.raises(ConfigError, match="row 17"):
        ArraySource(x)

    class Leaky:  # a source whose batches go bad after construction
        d_in, n_tokens, true_dictionary = 8, None, None

        def batches(self, bs, *, seed):
            while True:
                b = np.ones((bs, 8), np.float32)
                b[0, 0] = np.nan
                yield b

        def heldout(self):
            return np.ones((4, 8), np.float32)

    with pytest.raises(ConfigError, match="NaN"):
        train(SAEConfig(d_in=8, d_sae=16, k=2, normalize_input=False), TrainConfig(batch_size=8, steps=3), Leaky(), [0], progress=False)
