"""Scaling out: sharded training equals one device, uneven member counts, sharded stability, the
runner's mesh, the Colab notebook, several-host helpers and bfloat16 compute.

The multi-device checks need 8 simulated CPU devices, which must be configured before JAX starts,
while the rest of the test session uses one device: they run once in a subprocess
(``tests/multidevice_checks.py``) and the tests below assert on its JSON output.
"""

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import ConfigError, SAEConfig, SyntheticSource, TrainConfig, precision, sae, sharding
from saejax.train import train

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"
TOL = 1e-5


@pytest.fixture(scope="module")
def multi():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_checks.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    return out


# ----------------------------------------------------------------------------- 8 simulated devices
def test_eight_seeds_on_eight_devices_equal_one_device(multi):
    r = multi["even"]
    assert r["mesh_shape"] == [8, 1] and "members=8 x batch=1 over 8 cpu devices" in r["mesh"]
    assert r["state_devices"] == 8 and r["state_shard"] == [1, 32, 16]  # one seed per device
    assert r["rel_err"] <= TOL and r["hist_err"] <= TOL, r


def test_twelve_seeds_on_eight_devices_pad_and_trim(multi):
    r = multi["uneven"]  # each seed its own data order: the data is sharded by member too
    assert r["state_shape"] == [16, 32, 16] and r["state_shard"] == [2, 32, 16]  # padded to 16
    assert r["data_shard"][0] == 2
    assert r["params_shape"] == [12, 32, 16]  # trimmed back
    assert r["rel_err"] <= TOL and r["hist_err"] <= TOL and r["finite"], r
    assert r["resumed_from"] == 40 and r["resume_err"] == 0.0  # checkpoints are mesh-independent


def test_fewer_members_than_devices_shard_the_batch(multi):
    r = multi["members_x_batch"]  # 3 BatchTopK seeds: top-k over a batch split across devices
    assert r["mesh_shape"] == [4, 2] and r["state_devices"] == 8
    assert r["data_shard"] == [40, 32, 16]  # [chunk, batch / 2, d_in]
    assert r["rel_err"] <= TOL and r["hist_err"] <= TOL, r


def test_explicit_mesh_shape_with_bfloat16(multi):
    r = multi["explicit_shape_bf16"]
    assert r["mesh_shape"] == [4, 2] and r["data_dtype"] == "bfloat16" and r["params_shape"] == [6, 32, 16]
    assert r["rel_err"] <= 1e-3 and r["finite"], r  # bf16 rounding differs with the batch split


def test_stability_sharded_over_pairs_equals_single_device(multi):
    r = multi["stability"]
    for case in ("plain", "masked", "chosen_pairs"):
        assert r[case]["pairs_equal"] and r[case]["max_abs"] == 0.0, (case, r[case])
    rep = r["report"]  # the whole stability report, JSON-identical
    assert rep["equal"] and rep["sharded_calls"] > 0 and rep["devices"] == [8], rep


def test_notebook_cells_run_and_runner_uses_every_device(multi):
    r = multi["notebook"]
    assert r["skipped"] == 1 and r["cells_run"] >= 4  # only the TPU install cell is replaced
    assert r["state_devices"] == 8  # the runner trained over all 8 devices by default
    assert any("members=8 x batch=1 over 8 cpu devices" in ln for ln in r["runner_mesh_lines"]), r  # printed by the runner
    assert r["figures"] > 0
    full = r["full_grid"]  # what the notebook runs on a TPU: GPT-2 layer 6, a seed per core (>= 8)
    assert "gpt2 blocks.6.hook_resid_post" in full["source"] and full["seeds"] >= 8 and len(full["units"]) == 4


# ----------------------------------------------------------------------------- one device
def test_notebook_is_valid_and_uses_no_deprecated_tpu_setup():
    import nbformat

    raw = json.loads(NOTEBOOK.read_text())
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    install = [c for c in code if "tpu-install" in c.metadata.get("tags", [])]
    assert len(install) == 1 and '"jax[tpu]"' in install[0].source and "<owner>" not in install[0].source
    text = NOTEBOOK.read_text()
    assert "setup_tpu" not in text and "colab_tpu" not in text.replace("colab_tpu.ipynb", "")


def test_notebook_install_cell_finds_a_wheel_a_checkout_or_says_what_is_missing(tmp_path, monkeypatch):
    """The TPU install cell run with pip replaced by a recorder: it installs an uploaded wheel (with
    the extras), else a checkout, else stops with one line naming what to upload."""
    import subprocess as sp

    import nbformat

    cell = next(c for c in nbformat.read(str(NOTEBOOK), as_version=4).cells if "tpu-install" in c.metadata.get("tags", []))
    calls = []
    monkeypatch.setattr(sp, "run", lambda cmd, check: calls.append(cmd[4:]))
    monkeypatch.delenv("SAEJAX_SOURCE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saejax").mkdir()
    (tmp_path / "saejax" / "pyproject.toml").write_text("")
    exec(compile(cell.source, "install", "exec"), {})
    assert calls == [["-q", "-U", "jax[tpu]"], ["-q", f"{tmp_path / 'saejax'}[hf,datasets]"]]  # a path, not PyPI's
    (tmp_path / "saejax-0.1.0-py3-none-any.whl").write_text("")
    calls.clear()
    exec(compile(cell.source, "install", "exec"), {})
    assert calls[1] == ["-q", f"{tmp_path / 'saejax-0.1.0-py3-none-any.whl'}[hf,datasets]"]
    for p in tmp_path.iterdir():
        p.unlink() if p.is_file() else (p / "pyproject.toml").unlink()
    with pytest.raises(SystemExit, match="no wheel"):
        exec(compile(cell.source, "install", "exec"), {})


@pytest.mark.parametrize("n, devices, bs, shape, want", [
    (8, 8, 64, None, (8, 1)),
    (12, 8, 64, None, (8, 1)),
    (3, 8, 64, None, (4, 2)),
    (1, 8, 64, None, (1, 8)),
    (2, 8, 12, None, (2, 4)),
    (1, 8, 6, None, (1, 2)),  # the batch axis must divide the batch
    (5, 8, 64, (2, -1), (2, 4)),
    (5, 8, 64, (-1, 1), (8, 1)),
    (5, 1, 64, None, (1, 1)),
])
def test_mesh_shape_choice(n, devices, bs, shape, want):
    assert sharding.mesh_shape(n, bs, shape, devices) == want


def test_mesh_shape_and_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="needs 4x4 devices but 8 are available"):
        sharding.mesh_shape(4, 64, (4, 4), 8)
    for kw, match in [(dict(mesh_shape=(3, 5)), "batch_size=64 must be divisible"),
                      (dict(mesh_shape=(0, 1)), "mesh_shape must be"),
                      (dict(compute_dtype="float16"), "compute_dtype must be")]:
        with pytest.raises(ConfigError, match=match) as e:
            TrainConfig(batch_size=64, steps=1, **kw)
        assert "\n" not in str(e.value)
    assert TrainConfig(batch_size=64, steps=1, mesh_shape=[2, 1]).mesh_shape == (2, 1)  # hashable


def test_pad_and_trim_members_round_trip():
    tree = {"a": np.arange(6.0).reshape(3, 2), "b": jnp.arange(3)}
    padded = sharding.pad_members(tree, 8)
    assert padded["a"].shape == (8, 2) and isinstance(padded["a"], np.ndarray)
    np.testing.assert_array_equal(padded["b"][3:], 2)  # copies of the last member
    back = sharding.trim_members(padded, 3)
    np.testing.assert_array_equal(back["a"], tree["a"])
    np.testing.assert_array_equal(back["b"], tree["b"])


@pytest.mark.parametrize("env, multi_host", [
    ({}, False),
    ({"SAEJAX_DISTRIBUTED": "1"}, True),
    ({"SAEJAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU such as Colab's
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
])
def test_distributed_detection(env, multi_host):
    assert (sharding.distributed_reason(env) is not None) == multi_host
    if not multi_host:
        assert sharding.maybe_initialize_distributed(env) is False  # and touches nothing
    assert sharding.is_main_process()


def test_bfloat16_loss_has_float32_gradients_close_to_float32():
    cfg = SAEConfig(d_in=16, d_sae=32, arch="topk", k=3)
    x = jnp.asarray(SyntheticSource(d=16, n_features=40, s=3).heldout()[:256])
    params = sae.init(cfg, jax.random.PRNGKey(0), x.mean(0))
    hp = {"lr": 1.0, "l1_coef": 0.0, "l0_coef": 0.0, "aux_coef": 1 / 32}
    dead = jnp.zeros(32, bool)
    f32 = partial(sae.loss, cfg)
    assert precision.in_compute_dtype(f32, "float32") is f32
    grad = lambda fn: jax.jit(jax.grad(lambda p: fn(p, x, hp, dead, 1.0)[0]))(params)  # noqa: E731
    g32, g16 = grad(f32), grad(precision.in_compute_dtype(f32, "bfloat16"))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(g16))
    for k in g32:
        assert float(jnp.linalg.norm(g16[k] - g32[k]) / jnp.linalg.norm(g32[k])) < 0.05, k


def test_bfloat16_training_tracks_float32():
    cfg = SAEConfig(d_in=16, d_sae=32, arch="topk", k=3, dead_tokens=2048)
    tc = TrainConfig(batch_size=128, steps=100, lr=3e-3, log_every=10, chunk_steps=100)
    src = SyntheticSource(d=16, n_features=40, s=3, n_heldout=512)
    a = train(cfg, tc, src, [0, 1], progress=False)
    b = train(cfg, tc.replace(compute_dtype="bfloat16"), src, [0, 1], progress=False)
    assert all(v.dtype == np.float32 for v in b.params.values())  # float32 master weights
    assert np.all(b.history["loss"][:, -1] < 0.7 * b.history["loss"][:, 0])
    assert np.min(np.sum(a.params["W_dec"] * b.params["W_dec"], -1)) > 0.99
    np.testing.assert_allclose(b.history["fvu"][:, -1], a.history["fvu"][:, -1], atol=0.01)


def test_describe_mesh_on_this_machine():
    line = sharding.describe_mesh()
    assert line.startswith(f"mesh: members={jax.device_count()} x batch=1 over {jax.device_count()} ")
