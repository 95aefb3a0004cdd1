"""Loading pretrained SAEs: each format's files, written with its exact key names, shapes and
config fields, must run in saejax exactly as that library's own forward pass (re-implemented
below in NumPy from the library's code)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from saejax import sae
from saejax.compare import compare, main
from saejax.errors import ConfigError
from saejax.pretrained import load_sae

D_IN, D_SAE, K = 16, 40, 6


def relu(a):
    return np.maximum(a, 0.0)


def topk_rows(a, k):
    """Keep the k largest entries of each row (``torch.topk`` + ``scatter``), zero elsewhere."""
    idx = np.argsort(-a, axis=1)[:, :k]
    out = np.zeros_like(a)
    np.put_along_axis(out, idx, np.take_along_axis(a, idx, 1), 1)
    return out


def weights(seed=0, d_in=D_IN, d_sae=D_SAE):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (scale * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {"W_enc": f(d_in, d_sae, scale=0.4), "b_enc": f(d_sae, scale=0.3), "W_dec": f(d_sae, d_in, scale=0.5),
            "b_dec": f(d_in, scale=0.5), "threshold": rng.uniform(0.05, 0.6, d_sae).astype(np.float32)}


def x_batch(seed=1, d_in=D_IN):
    return np.random.default_rng(seed).standard_normal((32, d_in)).astype(np.float32)


def check_forward(source, ref_z, ref_x_hat, x, fmt, arch, **kw):
    cfg, params, meta = load_sae(source, **kw)
    assert meta["format"] == fmt and cfg.arch == arch and not cfg.normalize_input
    assert (cfg.d_in, cfg.d_sae) == (x.shape[1], ref_z.shape[1])
    z = sae.encode(cfg, {k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x))
    x_hat = sae.decode({k: jnp.asarray(v) for k, v in params.items()}, z)
    assert (np.asarray(z) > 0).sum() == (ref_z > 0).sum() > 0
    np.testing.assert_allclose(np.asarray(z), ref_z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_hat), ref_x_hat, rtol=1e-5, atol=1e-5)
    return cfg, params, meta


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- Gemma Scope
def write_gemma_scope(directory, w):
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "params.npz", **w)
    return directory


def test_gemma_scope_params_npz(tmp_path):
    w, x = weights(), x_batch()
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope's tutorial: no b_dec subtraction
    z = (pre > w["threshold"]) * relu(pre)
    d = write_gemma_scope(tmp_path / "layer_12" / "width_16k" / "average_l0_82", w)
    check_forward(d, z, z @ w["W_dec"] + w["b_dec"], x, "gemma_scope", "jumprelu")
    _, _, meta = check_forward(d / "params.npz", z, z @ w["W_dec"] + w["b_dec"], x, "gemma_scope", "jumprelu")
    assert meta["path"].endswith("params.npz")


# ----------------------------------------------------------------------------- SAELens
@pytest.mark.parametrize("architecture,apply_b_dec", [("jumprelu", False), ("standard", True), ("topk", False)])
def test_saelens(tmp_path, architecture, apply_b_dec):
    w, x = weights(2), x_batch()
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if architecture == "jumprelu":
        tensors["threshold"] = w["threshold"]
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "hook_name": "blocks.12.hook_resid_post"}
    write_json(tmp_path / "cfg.json", cfg | ({"k": K} if architecture == "topk" else {}))
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]  # SAELens process_sae_in + encode
    z = {"standard": relu(pre), "jumprelu": relu(pre) * (pre > w["threshold"]), "topk": relu(topk_rows(pre, K))}[architecture]
    arch = {"standard": "relu"}.get(architecture, architecture)
    check_forward(tmp_path, z, z @ w["W_dec"] + w["b_dec"], x, "saelens", arch)


def test_saelens_runtime_normalisation_is_refused(tmp_path):
    w = weights()
    save_file({k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, str(tmp_path / "sae_weights.safetensors"))
    write_json(tmp_path / "cfg.json", {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE,
                                       "normalize_activations": "layer_norm"})
    with pytest.raises(ConfigError, match="normalize_activations='layer_norm'"):
        load_sae(tmp_path)


# ----------------------------------------------------------------------------- EleutherAI sparsify
def write_sparsify(directory, w, dtype=None, **cfg):
    tensors = {"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is None:
        save_file(tensors, str(directory / "sae.safetensors"))
    else:
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()}, str(directory / "sae.safetensors"))
    write_json(directory / "cfg.json", {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                                        "num_latents": D_SAE, "k": K, "multi_topk": False, "skip_connection": False,
                                        "transcode": False, "d_in": D_IN} | cfg)
    return directory


def sparsify_ref(w, x):
    pre = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # fused_encoder: relu(linear), then topk
    z = topk_rows(pre, K)
    return z, z @ w["W_dec"] + w["b_dec"]


def test_sparsify_hookpoints(tmp_path):
    w, x = weights(3), x_batch()
    write_sparsify(tmp_path / "layers.6", w)
    write_sparsify(tmp_path / "layers.7", weights(4))
    _, _, meta = check_forward(tmp_path, *sparsify_ref(w, x), x, "sparsify", "topk", hookpoint="layers.6")
    assert meta["path"].endswith("layers.6")
    check_forward(tmp_path / "layers.6", *sparsify_ref(w, x), x, "sparsify", "topk")
    with pytest.raises(ConfigError, match=r"several hookpoints.*'layers\.6', 'layers\.7'"):
        load_sae(tmp_path)
    with pytest.raises(ConfigError, match=r"no SAE for hookpoint 'layers\.8'.*'layers\.6'"):
        load_sae(tmp_path, hookpoint="layers.8")


def test_sparsify_bfloat16_and_latent_count(tmp_path):
    torch = pytest.importorskip("torch")
    w = {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in weights(5).items()}
    x = x_batch()
    d = write_sparsify(tmp_path / "sae", w, dtype=torch.bfloat16)
    check_forward(d, *sparsify_ref(w, x), x, "sparsify", "topk")
    write_json(d / "cfg.json", json.loads((d / "cfg.json").read_text()) | {"num_latents": 0, "expansion_factor": 1})
    with pytest.raises(ConfigError, match=r"encoder\.weight has shape \(40, 16\), expected \(16, 16\)"):
        load_sae(d)  # num_latents 0: d_in * expansion_factor latents


@pytest.mark.parametrize("change,message", [({"skip_connection": True}, "skip_connection"),
                                            ({"transcode": True}, "transcode"),
                                            ({"activation": "groupmax"}, "'groupmax'")])
def test_sparsify_variants_are_refused(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_sae(write_sparsify(tmp_path / "sae", weights(), **change))


# ----------------------------------------------------------------------------- dictionary_learning
def write_dictionary_learning(directory, dict_class, state, **trainer):
    torch = pytest.importorskip("torch")
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.as_tensor(v) for k, v in state.items()}, directory / "ae.pt")
    write_json(directory / "config.json", {"trainer": {"trainer_class": "Trainer", "dict_class": dict_class,
                                                       "activation_dim": D_IN, "dict_size": D_SAE, "lr": 1e-3,
                                                       "layer": 3, "lm_name": "m"} | trainer,
                                           "buffer": {"d_submodule": D_IN}})
    return directory


UNSET_THRESHOLD = {"k": np.int32(K), "threshold": np.float32(-1.0)}  # buffers of a TopK / BatchTopK SAE


def linear_state(w, bias_name="b_dec"):
    """``nn.Linear`` encoder (weight ``[dict_size, activation_dim]``) and bias-free decoder
    (weight ``[activation_dim, dict_size]``)."""
    return {"encoder.weight": w["W_enc"].T.copy(), "encoder.bias": w["b_enc"], "decoder.weight": w["W_dec"].T.copy(),
            bias_name: w["b_dec"]}


def test_dictionary_learning_autoencoder(tmp_path):
    w, x = weights(6), x_batch()
    d = write_dictionary_learning(tmp_path, "AutoEncoder", linear_state(w, "bias"))
    f = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # encoder(x - bias), then ReLU
    check_forward(d, f, f @ w["W_dec"] + w["b_dec"], x, "dictionary_learning", "relu")


def test_dictionary_learning_topk(tmp_path):
    w, x = weights(7), x_batch()
    d = write_dictionary_learning(tmp_path, "AutoEncoderTopK", linear_state(w) | UNSET_THRESHOLD, k=K)
    f = topk_rows(relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]), K)
    cfg, _, _ = check_forward(d, f, f @ w["W_dec"] + w["b_dec"], x, "dictionary_learning", "topk")
    assert cfg.k == K


@pytest.mark.parametrize("dict_class", ["BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_batchtopk_threshold(tmp_path, dict_class):
    w, x = weights(8), x_batch()
    extra = {"k": np.int32(K), "threshold": np.float32(0.3)}
    if dict_class == "BatchTopKSAE":
        state = linear_state(w) | extra
    else:
        state = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")} | extra | {"group_sizes": np.array([10, 30])}
    d = write_dictionary_learning(tmp_path, dict_class, state, k=K)
    post = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    f = post * (post > 0.3)  # encode(use_threshold=True), the default at inference
    check_forward(d, f, f @ w["W_dec"] + w["b_dec"], x, "dictionary_learning", "jumprelu")


def test_dictionary_learning_batchtopk_without_threshold_keeps_batch_topk(tmp_path):
    w = weights(9)
    d = write_dictionary_learning(tmp_path, "BatchTopKSAE", linear_state(w) | UNSET_THRESHOLD, k=K)
    cfg, params, _ = load_sae(d)
    assert cfg.arch == "batchtopk" and cfg.k == K and "log_threshold" not in params


def test_dictionary_learning_jumprelu(tmp_path):
    w, x = weights(10), x_batch()
    d = write_dictionary_learning(tmp_path, "JumpReluAutoEncoder", {k: w[k] for k in w}, target_l0=20.0)
    pre = x @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input is False
    f = relu(pre * (pre > w["threshold"]))
    check_forward(d, f, f @ w["W_dec"] + w["b_dec"], x, "dictionary_learning", "jumprelu")


# ----------------------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    w = weights()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"not a recognised SAE directory \(found notes.txt\); expected params.npz"):
        load_sae(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sae(tmp_path / "missing")
    bad = write_gemma_scope(tmp_path / "bad_shape", w | {"W_dec": w["W_dec"][:, :8]})
    with pytest.raises(ConfigError, match=r"W_dec has shape \(40, 8\), expected \(40, 16\)"):
        load_sae(bad)
    no_thr = write_gemma_scope(tmp_path / "no_threshold", {k: v for k, v in w.items() if k != "threshold"})
    with pytest.raises(ConfigError, match="has no tensor 'threshold'"):
        load_sae(no_thr)
    d = write_dictionary_learning(tmp_path / "gated", "GatedAutoEncoder", linear_state(w))
    with pytest.raises(ConfigError, match="dict_class 'GatedAutoEncoder' is not supported"):
        load_sae(d)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_sae(d)
    d = write_dictionary_learning(tmp_path / "dl", "AutoEncoder", {"encoder.weight": w["W_enc"].T.copy()})
    with pytest.raises(ConfigError, match="has no tensor 'encoder.bias'"):
        load_sae(d)
    d = write_sparsify(tmp_path / "sp", w)
    (d / "cfg.json").unlink()
    with pytest.raises(ConfigError, match="has no cfg.json"):
        load_sae(d)


def test_hub_repo_ids(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def offline(repo, allow_patterns=None):
        calls.append((repo, allow_patterns))
        raise OSError("offline\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError) as e:
        load_sae("google/gemma-scope-2b-pt-res", subfolder="layer_12/width_16k/average_l0_82")
    msg = str(e.value)
    assert "\n" not in msg and "'google/gemma-scope-2b-pt-res'" in msg and "huggingface-cli download" in msg
    assert calls == [("google/gemma-scope-2b-pt-res", ["layer_12/width_16k/average_l0_82/*"])]
    write_gemma_scope(tmp_path / "layer_12" / "width_16k" / "average_l0_82", weights())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns=None: str(tmp_path))
    cfg, _, meta = load_sae("google/gemma-scope-2b-pt-res", subfolder="layer_12/width_16k/average_l0_82")
    assert meta["format"] == "gemma_scope" and cfg.d_sae == D_SAE
    with pytest.raises(ConfigError, match="needs subfolder="):
        load_sae("google/gemma-scope-2b-pt-res")  # never the whole repo


# ----------------------------------------------------------------------------- experiments/gemma_scope.py
def test_compare_gemma_scope_widths(tmp_path, capsys):
    """The docstring's cross-width comparison on two local Gemma Scope directories."""
    rng = np.random.default_rng(11)
    narrow, wide = weights(12, d_sae=24), weights(13, d_sae=48)
    wide["W_dec"][rng.permutation(48)[:24]] = narrow["W_dec"] * 2.0  # the wide one contains the narrow one
    a = write_gemma_scope(tmp_path / "layer_12" / "width_16k" / "average_l0_82", narrow)
    b = write_gemma_scope(tmp_path / "layer_12" / "width_32k" / "average_l0_76", wide)
    assert main([str(b), str(a / "params.npz")]) == 0
    out = capsys.readouterr().out
    assert "width_16k" in out and "(24) vs" in out and "PWMCC" in out
    (row,) = compare([a, b])
    assert row["d_sae_a"] == 24 and row["mean_best_a_in_b"] == pytest.approx(1.0, abs=1e-5)
    assert main([str(a), str(tmp_path / "layer_12")]) == 2
    assert "not a recognised SAE directory" in capsys.readouterr().err
