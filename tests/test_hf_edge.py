"""The Hugging Face edge on tiny random models built from configs: Auto class, blocks, encoder
sites and windows, content fingerprints, corpus readers, bfloat16 storage, plans and downstream."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_activations import WORDS, save_tiny, tiny_tokenizer, write_corpus  # noqa: E402

from saejax import activations as A  # noqa: E402
from saejax import hf_models as M  # noqa: E402
from saejax.errors import ConfigError  # noqa: E402
from saejax.hf_locate import locate  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny(kind: str):
    torch.manual_seed(0)
    v = len(SPECIAL) + len(WORDS)
    if kind in ("bert", "bert-mlm"):
        cfg = transformers.BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)
        return (transformers.BertForMaskedLM if kind == "bert-mlm" else transformers.BertModel)(cfg).eval()
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=64)
        return transformers.DistilBertForMaskedLM(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=v, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                      eos_token_id=1)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def save(path, kind):
    tiny(kind).save_pretrained(path)
    (bert_tokenizer() if kind in ("bert", "bert-mlm", "distilbert") else tiny_tokenizer()).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind, auto, blocks", [
    ("gpt2", "AutoModelForCausalLM", "transformer.h"), ("llama", "AutoModelForCausalLM", "model.layers"),
    ("bert", "AutoModel", "encoder.layer"), ("bert-mlm", "AutoModelForMaskedLM", "bert.encoder.layer"),
    ("distilbert", "AutoModelForMaskedLM", "distilbert.transformer.layer")])
def test_auto_class_and_block_table(tmp_path, kind, auto, blocks):
    ref = locate(save(tmp_path / kind, kind))
    assert ref.info.encoder == (kind not in ("gpt2", "llama")) and (ref.info.n_layers, ref.info.d_model) == (2, 32)
    assert M.auto_class_name(ref.path, ref.info) == auto
    model = M.load_model(ref.path)
    assert M.find_blocks(model) is M._walk(model, blocks)
    assert M.find_blocks(model, blocks=blocks) is M._walk(model, blocks)  # the override, from the full model


def test_block_rule_and_override_errors(monkeypatch):
    model = tiny("llama")
    monkeypatch.delitem(M.BLOCK_TABLE, "llama")  # not in the table: the ModuleList of num_hidden_layers
    assert M.find_blocks(model) is model.model.layers
    with pytest.raises(ConfigError, match=r"has no block list at blocks='model.nope'"):
        M.find_blocks(model, blocks="model.nope")
    with pytest.raises(ConfigError, match="site attn_out is not defined for Linear blocks"):
        M.site_module(torch.nn.Linear(2, 2), "attn_out")


@pytest.mark.parametrize("kind", ["bert-mlm", "distilbert"])
def test_encoder_sites(kind):
    model = tiny(kind)
    x = torch.randint(5, 45, (2, 10))
    blocks = M.find_blocks(model)
    got = M.capture(model, x, [(l, s) for l in range(2) for s in M.SITES])
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states
    for l, block in enumerate(blocks):  # post-LN blocks: no final norm, every layer matches hidden_states
        torch.testing.assert_close(got[(l, "resid_pre")], hs[l], rtol=0, atol=0)
        torch.testing.assert_close(got[(l, "resid_post")], hs[l + 1], rtol=0, atol=0)
        if kind == "bert-mlm":  # resid_post = LN2(LN1(resid_pre + attn_out) + mlp_out)
            mid = block.attention.output.LayerNorm(got[(l, "resid_pre")] + got[(l, "attn_out")])
            torch.testing.assert_close(block.output.LayerNorm(mid + got[(l, "mlp_out")]), got[(l, "resid_post")])
    ids = x.numpy()
    for site in M.SITES:
        np.testing.assert_allclose(M.patched_logits(model, ids, 1, site, lambda a: a),
                                   M.patched_logits(model, ids, 1, site, None), rtol=1e-5, atol=1e-5)


def test_encoder_windows_and_positions(tmp_path):
    model_dir = save(tmp_path / "b", "bert")
    corpus = write_corpus(tmp_path / "c.txt")
    src = A.extract_one(A.ExtractSpec(model_dir, A.TextFiles(corpus), layers=1, ctx_len=12, n_tokens=100),
                        cache_dir=tmp_path / "cache", progress=False)
    tokens, mask = src.extra("tokens"), src.extra("mask")
    assert (tokens[:, 0] == 2).all() and (tokens[:, -1] == 3).all()  # [CLS] ... [SEP] in every window
    assert not mask[:, 0].any() and not mask[:, -1].any() and mask.sum() == 100
    last = A.extract_one(A.ExtractSpec(model_dir, A.TextFiles(corpus), layers=1, ctx_len=12, n_tokens=5,
                                       positions="last"), cache_dir=tmp_path / "cache", progress=False)
    assert last.extra("mask").sum(1).tolist() == [1] * 5 and last.extra("mask")[:, -2].all()  # before [SEP]


def test_fingerprint_by_content_copy_hits_and_names(tmp_path, monkeypatch):
    model_dir = save(tmp_path / "orig", "gpt2")
    corpus = write_corpus(tmp_path / "c.txt")
    spec = lambda m, c=corpus: A.ExtractSpec(m, A.TextFiles(c), layers=1, ctx_len=8, n_tokens=80)  # noqa: E731
    first = A.extract_one(spec(model_dir), cache_dir=tmp_path / "cache", progress=False)
    assert first.path.name.startswith("orig-L1-resid_post-")
    shutil.copytree(model_dir, tmp_path / "copy")
    shutil.copy(corpus, tmp_path / "c2.txt")
    monkeypatch.setattr(A, "load_model", lambda *a, **k: pytest.fail("a copy must hit the cache"))
    again = A.extract_one(spec(str(tmp_path / "copy"), str(tmp_path / "c2.txt")), cache_dir=tmp_path / "cache",
                          progress=False)
    assert again.path == first.path
    assert locate(model_dir).weights == locate(str(tmp_path / "copy")).weights


def test_text_readers_stream_files_directories_and_token_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("w1 w2\nw3\n\n\nw4 w5\n")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text(json.dumps({"text": "w6 w7"}) + "\n\n" + json.dumps({"text": "w8"}) + "\n")
    files = A.TextFiles(str(tmp_path / "d"))
    assert list(files.texts()) == ["w1 w2\nw3", "w4 w5", "w6 w7", "w8"]
    assert [n for n, _ in files.fingerprint()["files"]] == ["a.txt", "sub/b.jsonl"]
    (tmp_path / "e").mkdir()
    with pytest.raises(ConfigError, match="holds no .txt, .jsonl or .parquet file"):
        A.TextFiles(str(tmp_path / "e")).files()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"")
        with pytest.raises(ConfigError, match=r"needs pyarrow, which is not installed: pip install pyarrow"):
            list(A.TextFiles(str(tmp_path / "x.parquet")).texts())
    model_dir = save_tiny(tmp_path / "m")
    stream = np.random.default_rng(0).integers(3, 40, 500)
    np.save(tmp_path / "s.npy", stream)
    src = A.extract_one(A.ExtractSpec(model_dir, A.TokenFile(str(tmp_path / "s.npy")), ctx_len=10, n_tokens=90),
                        cache_dir=tmp_path / "cache", progress=False)
    tokens = src.extra("tokens")
    assert (tokens[:, 0] == 0).all() and np.array_equal(tokens[:, 1:].ravel(), stream[:90])  # BOS + the stream
    np.save(tmp_path / "c.npy", stream[:400].reshape(40, 10))
    given = A.extract_one(A.ExtractSpec(model_dir, A.TokenFile(str(tmp_path / "c.npy")), n_tokens=50),
                          cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(given.extra("tokens"), stream[:50].reshape(5, 10))


def test_bfloat16_storage(tmp_path):
    model_dir, corpus = save_tiny(tmp_path / "m"), write_corpus(tmp_path / "c.txt")
    spec = lambda d: A.ExtractSpec(model_dir, A.TextFiles(corpus), ctx_len=8, n_tokens=60, store_dtype=d)  # noqa: E731
    f32 = A.extract_one(spec("float32"), cache_dir=tmp_path / "cache", progress=False).read()
    bf = A.extract_one(spec("bfloat16"), cache_dir=tmp_path / "cache", progress=False)
    assert bf.shards[0].dtype == np.uint16 and bf.manifest["dtype"] == "bfloat16"
    np.testing.assert_allclose(bf.read(), f32, rtol=2**-8, atol=1e-6)


def test_plan_reads_configs_only(tmp_path, monkeypatch):
    model_dir, corpus = save_tiny(tmp_path / "m"), write_corpus(tmp_path / "c.txt")
    spec = A.ExtractSpec(model_dir, A.TextFiles(corpus), layers=(0, 2), ctx_len=8, n_tokens=100)
    monkeypatch.setattr(A, "load_model", lambda *a, **k: pytest.fail("plan must not load the model"))
    t0 = time.time()
    p = A.plan(spec, cache_dir=tmp_path / "cache", heldout_frac=0.1)
    assert time.time() - t0 < 2 and (p.d_in, p.n_tokens, p.missing) == (32, 90, None)
    assert len(p.lines) == 2 and p.lines[0].startswith("extract m L0 resid_post: 100 tokens x 32")
    with pytest.raises(ConfigError, match=r"layer 3 is out of range for m \(3 layers\): valid layers are 0\.\.2"):
        A.plan(A.ExtractSpec(model_dir, A.TextFiles(corpus), layers=3), cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="token budget 100000 exceeds the corpus"):  # before any load
        A.extract(A.ExtractSpec(model_dir, A.TextFiles(corpus), ctx_len=8, n_tokens=100_000), cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    A.extract(spec, cache_dir=tmp_path / "cache", progress=False)
    assert all(line.startswith("cached: m-L") for line in A.plan(spec, cache_dir=tmp_path / "cache").lines)


def test_plan_hub_models_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    corpus = A.TextFiles(write_corpus(tmp_path / "c.txt"))
    p = A.plan(A.ExtractSpec("gpt2", corpus), cache_dir=tmp_path / "cache")
    assert p.missing == ("model 'gpt2' is not in the local Hugging Face cache and the hub is unreachable "
                         "(HF_HUB_OFFLINE or no network): download it with `huggingface-cli download gpt2` on a "
                         "machine with network, or pass a local directory")
    repo = tmp_path / "hub" / "models--org--tiny"  # a model downloaded before: the hub cache's layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee" * 6 + "abcd")
    save_tiny(repo / "snapshots" / ("c0ffee" * 6 + "abcd"))
    p = A.plan(A.ExtractSpec("org/tiny", corpus, layers=1, n_tokens=50, ctx_len=8), cache_dir=tmp_path / "cache")
    assert (p.d_in, p.missing) == (32, None) and p.lines[0].startswith("extract tiny L1 resid_post")
    assert A.extract_one(A.ExtractSpec("org/tiny", corpus, layers=1, n_tokens=50, ctx_len=8),
                         cache_dir=tmp_path / "cache", progress=False).n_total == 50


def identity_sae(d: int, scale=1.0, mean=None):
    """A ReLU SAE with x_hat = b_dec + scale * (x - b_dec) exactly (latents: relu(x), relu(-x));
    ``scale`` is a number or one factor per coordinate."""
    from saejax import SAEConfig

    eye = np.eye(d, dtype=np.float32)
    b_dec = np.zeros(d, np.float32) if mean is None else np.asarray(mean, np.float32)
    params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
              "W_dec": scale * np.concatenate([eye, -eye], 0), "b_dec": b_dec}
    return SAEConfig(d_in=d, d_sae=2 * d, arch="relu"), params


def test_hf_downstream_splice_and_probe(tmp_path):
    from saejax.downstream import hf_downstream

    model_dir, corpus = save_tiny(tmp_path / "m"), write_corpus(tmp_path / "c.txt", n_docs=120)
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS[:20] if i % 2 else WORDS[20:], 6)), "label": "ab"[i % 2]} for i in range(40)]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)))
    hf = A.HF(model=model_dir, hook="1.resid_post", dataset=corpus, ctx_len=8, n_tokens=400, heldout_frac=0.25,
              probe_dataset=str(tmp_path / "p.jsonl"))
    reader = hf.build(tmp_path / "cache", progress=False)
    cfg, good = identity_sae(32)
    _, poor = identity_sae(32, 0.3, reader.read(0, reader.n_tokens).mean(0))
    stacked = {k: np.stack([good[k], poor[k]]) for k in good}
    cols, rep = hf_downstream(hf, cfg, stacked, [None, None], [0, 1], analyses=("splice", "probe"),
                              cache_dir=tmp_path / "cache")
    assert rep["splice"]["seed0"]["loss_recovered_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    assert rep["splice"]["seed0"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rep["splice"]["seed1"]["ce"] != rep["splice"]["clean"]["ce"]
    assert cols["probe_label_raw_acc"] > 0.5 and 0 <= cols["probe_label_sae_acc"] <= 1
    bert = A.HF(model=save(tmp_path / "b", "bert"), hook="1.resid_post", dataset=corpus, ctx_len=8, n_tokens=100)
    with pytest.raises(ConfigError, match="splice is not available for b: it has no LM head"):
        hf_downstream(bert, cfg, stacked, [None, None], [0, 1], analyses=("splice",), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert-mlm", "distilbert"])
def test_frozen_prefix_forwards_equal_full_forwards_and_skip_the_prefix(kind):
    """Inside ``frozen_prefix`` the blocks upstream of the patch replay their recorded outputs:
    every patched forward (the first one patched too) equals the same forward run in full, a hook
    already on an upstream block still acts once per forward, and each upstream block runs once."""
    model = tiny(kind)
    rng = np.random.default_rng(0)
    ids = rng.integers(len(SPECIAL), len(SPECIAL) + len(WORDS), (3, 7))
    am = np.ones_like(ids)
    am[0, 5:] = 0  # a padded row: the attention mask must reach the replayed and the recomputed blocks
    blocks = M.find_blocks(model)
    # a steering hook on block 0: on replay it must act on the recorded (unsteered) output again
    blocks[0].register_forward_hook(lambda m, a, o: (o[0] + 0.1, *o[1:]) if isinstance(o, tuple) else o + 0.1)
    calls = [[] for _ in blocks]
    for b, c in zip(blocks, calls):  # a submodule runs only when its block really runs
        next(m for m in b.modules() if m is not b).register_forward_hook(lambda *_, c=c: c.append(1))
    funcs = [np.zeros_like, None, lambda x: 0.5 * x + 1.0, lambda x: x[::-1].copy()]
    for layer in (0, 1):
        for site in ("resid_pre", "resid_post", "mlp_out", "attn_out"):
            for positions in (None, [2, 4]):
                kw = dict(positions=positions, attention_mask=am)
                full = [M.patched_logits(model, ids, layer, site, f, **kw) for f in funcs]
                for c in calls:
                    c.clear()
                with M.frozen_prefix(model, layer, site):
                    fast = [M.patched_logits(model, ids, layer, site, f, **kw) for f in funcs]
                for i, (a, b) in enumerate(zip(full, fast)):
                    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=f"{kind} {layer} {site} {positions} func {i}")
                n_up = layer + 1 if site == "resid_post" else layer
                assert [len(c) for c in calls] == [1] * n_up + [len(funcs)] * (len(blocks) - n_up), (kind, layer, site)
                assert not any("forward" in b.__dict__ for b in blocks)  # restored on exit
    with M.frozen_prefix(model, 1, "resid_post"), pytest.raises(RuntimeError, match="other inputs"):
        M.patched_logits(model, ids, 1, "resid_post", None)
        M.patched_logits(model, ids[::-1].copy(), 1, "resid_post", None)  # another batch inside one block


def test_frozen_prefix_refuses_a_block_that_runs_twice():
    model = tiny("gpt2")
    model.transformer.h[1] = model.transformer.h[0]  # weight-shared blocks: one module, two depths
    ids = np.arange(len(SPECIAL), len(SPECIAL) + 6)[None]
    with M.frozen_prefix(model, 1, "resid_post"), pytest.raises(RuntimeError, match="ran twice"):
        M.patched_logits(model, ids, 1, "resid_post", None)
    assert "forward" not in model.transformer.h[0].__dict__
