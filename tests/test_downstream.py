"""Splicing reconstructions into a model: identity = clean, zero-ablation = 0% recovered, an SAE in between."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from saejax import ArraySource, SAEConfig, TrainConfig  # noqa: E402
from saejax.activations import capture, patched_logits  # noqa: E402
from saejax.downstream import next_token_scores, sae_reconstructor, splice  # noqa: E402
from saejax.train import train  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    rng = np.random.default_rng(0)  # a learnable language: arithmetic progressions mod 50
    start, step = rng.integers(0, 50, (512, 1)), rng.integers(1, 4, (512, 1))
    ids = (start + step * np.arange(12)) % 50
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is much faster than two contending ones
    for _ in range(150):  # a few seconds: enough for clean CE far below an ablated model's
        loss = model(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    ids = ids[:64]
    targets = np.concatenate([ids[:, 1:], np.full((64, 1), -1)], 1)
    return model.eval(), ids, targets


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "mlp_out", "attn_out"])
def test_identity_splice_equals_clean(tiny, site):
    model, ids, targets = tiny
    clean = patched_logits(model, ids, 1, site, None)
    same = patched_logits(model, ids, 1, site, lambda x: x)
    np.testing.assert_allclose(same, clean, rtol=1e-5, atol=1e-5)
    changed = patched_logits(model, ids, 1, site, np.zeros_like)
    assert np.abs(changed - clean).max() > 1e-2  # the hook really replaces something


def test_splice_scores(tiny):
    model, ids, targets = tiny
    pt = torch.as_tensor(ids)
    acts = capture(model, pt, [(1, "resid_pre")])[(1, "resid_pre")].numpy().reshape(-1, 32)
    src = ArraySource(np.repeat(acts, 4, 0))
    res = train(SAEConfig(d_in=32, d_sae=64, arch="topk", k=8), TrainConfig(batch_size=256, steps=300, lr=3e-3),
                src, [0, 1], progress=False)
    raw = res.raw_params()
    recon = {f"seed{i}": sae_reconstructor(res.sae_cfg, {k: np.asarray(v[i]) for k, v in raw.items()}) for i in range(2)}
    out = splice(model, ids, targets, 1, "resid_pre", {"identity": lambda x: x, **recon}, mean=acts.mean(0), batch=20)
    assert out["identity"]["ce"] == pytest.approx(out["clean"]["ce"], abs=1e-5)
    assert out["identity"]["loss_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    assert out["identity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["zero"]["loss_recovered_vs_zero"] == 0.0
    assert out["mean"]["loss_recovered_vs_mean"] == 0.0
    for s in ("seed0", "seed1"):
        assert 0.0 < out[s]["loss_recovered_vs_zero"] < 1.0 and out[s]["kl"] > 0


def test_scores_by_hand():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    s = next_token_scores(logits, np.array([[0, -1]]))
    assert s["ce"] == pytest.approx(np.log(2)) and s["acc"] == 1.0
