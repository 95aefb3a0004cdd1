"""Extraction: hooked sites equal what the model computes, for GPT-2, GPT-NeoX and Llama layouts.

Every model here is built from a config in the test (no hub access); text corpora are generated.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from saejax import activations as A  # noqa: E402
from saejax.errors import ConfigError  # noqa: E402

N_LAYERS = 3
WORDS = [f"w{i}" for i in range(40)]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=len(WORDS) + 3, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=N_LAYERS, n_head=4, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if family == "neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, **common)
        return transformers.GPTNeoXForCausalLM(cfg).eval()
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **common)
        return transformers.LlamaForCausalLM(cfg).eval()
    if family == "gemma2":
        cfg = transformers.Gemma2Config(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, head_dim=8,
                                        max_position_embeddings=64, **common)
        return transformers.Gemma2ForCausalLM(cfg).eval()
    raise AssertionError(family)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                unk_token="<unk>")


def save_tiny(path, family: str = "gpt2", seed: int = 0) -> str:
    tiny_model(family, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def write_corpus(path, n_docs: int = 60, seed: int = 0, kind: str = "txt") -> str:
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) for _ in range(n_docs)]
    if kind == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    else:
        path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    return str(path)


def blocks_and_norm(model, family):
    if family == "gpt2":
        return model.transformer.h, model.transformer.ln_f
    if family == "neox":
        return model.gpt_neox.layers, model.gpt_neox.final_layer_norm
    return model.model.layers, model.model.norm


SUBMODULES = {"gpt2": ("attn", "mlp"), "neox": ("attention", "mlp"), "llama": ("self_attn", "mlp")}
ALL_POINTS = [(l, s) for l in range(N_LAYERS) for s in A.SITES]


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_sites_equal_hidden_states_and_module_outputs(family):
    model = tiny_model(family)
    x = torch.randint(3, len(WORDS) + 3, (2, 12))
    blocks, final_norm = blocks_and_norm(model, family)
    # independent reference: plain hooks on the attention and MLP modules by their family names
    seen, handles = {}, []
    for i, block in enumerate(blocks):
        for site, name in zip(("attn_out", "mlp_out"), SUBMODULES[family]):
            def hook(mod, args, out, key=(i, site)):
                seen[key] = out[0] if isinstance(out, tuple) else out
            handles.append(getattr(block, name).register_forward_hook(hook))
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    got = A.capture(model, x, ALL_POINTS)
    assert len(hs) == N_LAYERS + 1
    for l in range(N_LAYERS):
        torch.testing.assert_close(got[(l, "resid_pre")], hs[l], rtol=0, atol=0)
        if l < N_LAYERS - 1:
            torch.testing.assert_close(got[(l, "resid_post")], hs[l + 1], rtol=0, atol=0)
        else:  # HF's last hidden state has the final norm applied; our resid_post does not
            torch.testing.assert_close(final_norm(got[(l, "resid_post")]), hs[l + 1])
        for site in ("attn_out", "mlp_out"):
            torch.testing.assert_close(got[(l, site)], seen[(l, site)], rtol=0, atol=0)
        # the sublayers' contributions add up to the residual update (parallel NeoX blocks too)
        torch.testing.assert_close(got[(l, "resid_pre")] + got[(l, "attn_out")] + got[(l, "mlp_out")],
                                   got[(l, "resid_post")], rtol=1e-5, atol=1e-5)


def test_sandwich_norm_family_reads_the_normed_sublayer_outputs():
    model = tiny_model("gemma2")
    x = torch.randint(3, 40, (2, 9))
    got = A.capture(model, x, ALL_POINTS)
    for l in range(N_LAYERS):
        torch.testing.assert_close(got[(l, "resid_pre")] + got[(l, "attn_out")] + got[(l, "mlp_out")],
                                   got[(l, "resid_post")], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_several_sites_in_one_pass_equal_separate_passes(family):
    model = tiny_model(family)
    x = torch.randint(3, 40, (3, 10))
    together = A.capture(model, x, ALL_POINTS)
    for pt in ALL_POINTS:  # alone, the pass stops right after the block holding pt
        alone = A.capture(model, x, [pt])
        assert list(alone) == [pt]
        torch.testing.assert_close(alone[pt], together[pt], rtol=0, atol=0)


def test_early_stop_skips_later_blocks():
    model = tiny_model("gpt2")
    ran = []
    for i, block in enumerate(model.transformer.h):
        block.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
    A.capture(model, torch.randint(3, 40, (1, 5)), [(0, "resid_post")])
    assert ran == [0]
    ran.clear()
    A.capture(model, torch.randint(3, 40, (1, 5)), [(1, "resid_pre")])
    assert ran == [0]


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model layout Linear: .*pass blocks='path.to.layers'"):
        A.find_blocks(torch.nn.Linear(2, 2))


def test_hook_names_and_source_study_specs():
    owt = A.HFDataset("Skylion007/openwebtext")
    assert A.ExtractSpec("gpt2", owt, sites=("blocks.0.hook_resid_pre",)).points == ((0, "resid_pre"),)
    assert A.ExtractSpec("gpt2", owt, layers=(6,), sites=("resid_post",)).points == ((6, "resid_post"),)
    llama = A.ExtractSpec("meta-llama/Llama-3.2-1B", owt, layers=(4, 8, 14), sites="resid_post", dtype="bfloat16")
    assert llama.points == ((4, "resid_post"), (8, "resid_post"), (14, "resid_post"))
    gemma = A.ExtractSpec("google/gemma-2-2b", owt, sites=("blocks.12.hook_resid_post", "mlp_out"), layers=12)
    assert gemma.points == ((12, "resid_post"), (12, "mlp_out"))
    assert hash(gemma) == hash(A.ExtractSpec("google/gemma-2-2b", owt, sites=("blocks.12.hook_resid_post", "mlp_out"), layers=12))


def test_text_extraction_matches_a_direct_forward(tmp_path):
    model_dir = save_tiny(tmp_path / "m", "llama")
    corpus = write_corpus(tmp_path / "c.jsonl", kind="jsonl")
    spec = A.ExtractSpec(model_dir, A.TextFiles(corpus), layers=(0, 2), sites=("resid_post", "attn_out"),
                         ctx_len=16, n_tokens=300, batch_size=5)
    out = A.extract(spec, cache_dir=tmp_path / "cache", progress=False)
    assert set(out) == {(0, "resid_post"), (2, "resid_post"), (0, "attn_out"), (2, "attn_out")}
    src = out[(2, "attn_out")]
    tokens, mask = src.extra("tokens"), src.extra("mask")
    assert src.n_tokens + src.n_heldout == 300 == mask.sum()
    assert (tokens[:, 0] == 0).all() and not mask[:, 0].any()  # every context starts with BOS, never stored
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    direct = A.capture(model, torch.from_numpy(tokens.astype(np.int64)), [(2, "attn_out")])[(2, "attn_out")]
    np.testing.assert_allclose(src.read(), direct.numpy()[mask], rtol=1e-5, atol=1e-6)


def test_txt_corpus_packs_documents_with_eos(tmp_path):
    model_dir = save_tiny(tmp_path / "m")
    spec = A.ExtractSpec(model_dir, A.TextFiles(write_corpus(tmp_path / "c.txt")), ctx_len=8, n_tokens=70,
                         drop_bos=False)
    src = A.extract_one(spec, cache_dir=tmp_path / "cache", progress=False, n_heldout=7)
    tokens, mask = src.extra("tokens"), src.extra("mask")
    assert tokens.shape == (9, 8) and mask.sum() == 70 and mask[:, 0].all()  # 9 contexts, last one trimmed
    assert (tokens == 1).any()  # documents are separated by EOS
    assert src.n_tokens == 63 and src.heldout().shape == (7, 32)


def test_hf_dataset_source_through_a_stand_in_datasets_module(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rows = [{"text": " ".join(rng.choice(WORDS, 20))} for _ in range(30)]
    calls = []

    def load_dataset(name, config=None, split=None, streaming=None, revision=None):
        calls.append((name, config, split, streaming))
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = A.ExtractSpec(save_tiny(tmp_path / "m", "neox"), A.HFDataset("org/corpus", "en"), ctx_len=16, n_tokens=100)
    src = A.extract_one(spec, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [("org/corpus", "en", "train", True)] and src.n_tokens + src.n_heldout == 100


def test_hf_source_adapter_for_experiment_files(tmp_path):
    import dataclasses

    src = A.HF(model=save_tiny(tmp_path / "m"), hook="blocks.1.hook_mlp_out",
               dataset=write_corpus(tmp_path / "c.txt"), ctx_len=8, n_tokens=120, heldout_frac=0.25)
    reader = A.hf_source(src, cache_dir=tmp_path / "cache")
    assert (reader.n_tokens, reader.n_heldout) == (90, 30)
    assert reader.manifest["fingerprint"]["site"] == "mlp_out" and reader.manifest["fingerprint"]["layer"] == 1
    assert A.hf_source(dataclasses.replace(src, hook="1.mlp_out"), cache_dir=tmp_path / "cache").path == reader.path
    experiment = pytest.importorskip("saejax.experiment")
    hf = experiment.HF(model=src.model, hook="blocks.1.hook_mlp_out", dataset=src.dataset, ctx_len=8, n_tokens=120)
    assert hf.build(tmp_path / "cache").path == reader.path  # the experiment-file source resolves to the same cache


def one_line_error(fn, match):
    with pytest.raises(ConfigError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny(tmp_path / "m")
    corpus = write_corpus(tmp_path / "c.txt", n_docs=10)
    files = A.TextFiles(corpus)
    go = lambda **kw: A.extract(A.ExtractSpec(**{"model": model_dir, "dataset": files, "ctx_len": 8,  # noqa: E731
                                                 "n_tokens": 50, **kw}), cache_dir=tmp_path / "cache", progress=False)
    one_line_error(lambda: go(model=str(tmp_path / "no-such-model")), "model path .*no-such-model does not exist")
    one_line_error(lambda: go(model="no-such-org/no-such-model"),
                   "model 'no-such-org/no-such-model' is not in the local Hugging Face cache and the hub is unreachable")
    one_line_error(lambda: go(layers=(3,)), r"layer 3 is out of range .*3 layers.*valid layers are 0\.\.2")
    one_line_error(lambda: go(sites=("resid_mid",)), "unknown site 'resid_mid': expected one of resid_pre")
    one_line_error(lambda: go(sites=("blocks.1.hook_z",)), "unknown site 'blocks.1.hook_z'")
    one_line_error(lambda: go(dataset=A.TextFiles(str(tmp_path / "missing.txt"))), "dataset file not found: .*missing.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    one_line_error(lambda: go(dataset=A.TextFiles(str(tmp_path / "empty.jsonl"))), "dataset file .*empty.jsonl is empty")
    one_line_error(lambda: A.TextFiles("corpus.csv"), "neither a .txt, .jsonl or .parquet file nor a directory")
    msg = one_line_error(lambda: go(n_tokens=10**6), r"token budget 1000000 exceeds the corpus: .* has only \d+ tokens")
    have = int(msg.split("has only ")[1].split()[0])
    assert go(n_tokens=have)[(0, "resid_post")].n_total == have  # exactly the corpus fits
    one_line_error(lambda: go(dtype="float64"), "dtype must be one of float32, float16, bfloat16")
    one_line_error(lambda: go(n_tokens=0), "n_tokens must be positive")
    one_line_error(lambda: go(layers=(-1,)), "layers must be non-negative")
    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr("builtins.__import__", _no_datasets(__import__))
    one_line_error(lambda: go(dataset=A.HFDataset("org/x")), r"needs the 'datasets' package: pip install")


def _no_datasets(real_import):
    def fake(name, *args, **kw):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kw)
    return fake


def test_named_sources_of_one_model_extract_in_one_pass(tmp_path, monkeypatch):
    """Two hooks of one model in one experiment: one forward pass fills both caches, and each
    source's build then reads the same numbers a separate extraction gives."""
    from saejax.experiment import HF

    model, corpus = save_tiny(tmp_path / "m"), write_corpus(tmp_path / "c.txt")
    srcs = [HF(model=model, hook=h, dataset=corpus, ctx_len=8, n_tokens=120) for h in ("0.resid_post", "1.mlp_out")]
    runs = []
    real = A._run
    monkeypatch.setattr(A, "_run", lambda spec, *a, **k: (runs.append(spec.points), real(spec, *a, **k))[1])
    assert A.extract_together(srcs + [srcs[0]], cache_dir=tmp_path / "cache", progress=False) == 1
    assert runs == [((0, "resid_post"), (1, "mlp_out"))]
    together = [s.build(tmp_path / "cache", progress=False) for s in srcs]
    assert len(runs) == 1  # built from the caches, no second pass
    for s, got in zip(srcs, together):
        alone = s.build(tmp_path / "alone", progress=False)
        np.testing.assert_allclose(got.take(np.arange(got.n_tokens)), alone.take(np.arange(alone.n_tokens)), rtol=1e-5, atol=1e-6)
