"""The bad-input battery: every case exits 2 with exactly one line on stderr naming the bad
value, before any training, and writes nothing."""

from pathlib import Path

import pytest

from saejax.run import main

ROOT = Path(__file__).parent.parent
SMOKE = str(ROOT / "experiments" / "smoke.py")

# (--set items or extra args, a string the one-line error must contain)
CASES = {
    "empty_widths": (["--set", "widths=()"], "widths is empty"),
    "lr_not_a_number": (["--set", "train.lr=abc"], "'abc'"),
    "batch_size_float": (["--set", "train.batch_size=1.5"], "1.5"),
    "duplicate_seeds": (["--set", "seeds=0,0,1"], "duplicate seeds [0]"),
    "malformed_list": (["--set", "seeds=[0,1"], "'[0,1'"),
    "malformed_seed_list_is_malformed": (["--set", "seeds=[0,1"], "cannot parse '[0,1'"),  # not "needs 2 seeds"
    "malformed_tuple": (["--set", "widths=(24,"], "'(24,'"),
    "negative_coef": (["--set", "l1_coefs=-1"], "-1"),
    "negative_heldout": (["--set", "heldout_tokens=-5"], "-5"),
    "zero_heldout": (["--set", "heldout_tokens=0"], "heldout_tokens"),
    "negative_seeds": (["--set", "seeds=-1,-2"], "-1"),
    "nan_lr": (["--set", "train.lr=nan"], "nan"),
    "inf_lr": (["--set", "train.lr=1e999"], "inf"),
    "unknown_key": (["--set", "widthz=3"], "'widthz'"),
    "unknown_train_key": (["--set", "train.lrr=1e-3"], "'lrr'"),
    "bad_kernel": (["--set", "sae.kernel=fast"], "'fast'"),
    "unknown_arch": (["--set", "archs=topkk"], "'topkk'"),
    "bad_source_value": (["--set", "source.s=0"], "s must be"),
    "unknown_source_key": (["--set", "source.bogus=1"], "'bogus'"),
    "zero_steps": (["--set", "steps=0"], "(0,)"),
    "k_too_large": (["--set", "ks=100"], "k=100"),
    "no_equals": (["--set", "seeds"], "'seeds'"),
    "bad_decay": (["--set", "train.decay=exp"], "'exp'"),
    "splice_on_synthetic": (["--set", "analyses=splice"], "'splice'"),
    "unknown_analysis": (["--set", "analyses=stability,bogus"], "'bogus'"),
    "bad_compute_dtype": (["--set", "train.compute_dtype=float16"], "'float16'"),
    "negative_aux_k": (["--set", "sae.aux_k=-1"], "-1"),
    "negative_dynamics": (["--set", "dynamics=-1"], "-1"),
    "epochs_and_steps": (["--set", "epochs=1.0,"], "exactly one of epochs or steps"),
    "bad_mesh_shape": (["--set", "train.mesh_shape=(3,)"], "(3,)"),
    "bool_for_int": (["--set", "train.log_every=True"], "True"),
    "string_width": (["--set", "widths=wide"], "'wide'"),
    "one_seed": (["--set", "seeds=3"], "at least 2 seeds"),
}


def _run(capsys, args, tmp_path):
    rc = main(args)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_set_value(name, capsys, tmp_path):
    extra, needle = CASES[name]
    out = tmp_path / "out"
    rc, lines = _run(capsys, [SMOKE, "--out", str(out), "--dry-run", *extra], tmp_path)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not out.exists()
    # the real run validates exactly what the dry run does
    rc, lines = _run(capsys, [SMOKE, "--out", str(out), "--no-progress", *extra], tmp_path)
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (out / "units").exists()


@pytest.mark.parametrize("text,needle", [
    ("def get_config(:\n", "syntax error"),
    ("import no_such_module_xyz\n", "no_such_module_xyz"),
    ("x = 1\n", "neither get_config"),
    ("def get_config():\n    return 3\n", "got int"),
])
def test_bad_experiment_file(text, needle, capsys, tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(text)
    rc, lines = _run(capsys, [str(path), "--dry-run"], tmp_path)
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines


def test_bad_paths(capsys, tmp_path):
    rc, lines = _run(capsys, [str(tmp_path / "missing.py"), "--dry-run"], tmp_path)
    assert rc == 2 and len(lines) == 1 and "missing.py" in lines[0], lines
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for flag in ("--cache-dir", "--out"):
        rc, lines = _run(capsys, [SMOKE, flag, str(blocker / "sub"), "--no-progress"], tmp_path)
        assert rc == 2 and len(lines) == 1 and "not writable" in lines[0], lines


# NaN in a cache: an experiment file whose source is an activation cache written here
NAN_EXPERIMENT = '''
from dataclasses import dataclass
from saejax.cache import CachedActivations
from saejax.data import SourcePlan
from saejax.experiment import Experiment

@dataclass(frozen=True)
class Cache:
    path: str
    def build(self, cache_dir=None, progress=True):
        return CachedActivations(self.path, n_heldout=200)
    def plan(self, cache_dir=None):
        return SourcePlan(16, 1800)
    def describe(self):
        return "cache " + self.path

def get_config():
    return Experiment(name="nan", source=Cache(%r), archs=("topk",), widths=(24,), ks=(2,), epochs=None,
                      steps=(120,), seeds=(0, 1), dynamics=0, checkpoint_every=40, heldout_tokens=200,
                      train={"batch_size": 64, "log_every": 10, "chunk_steps": 40, "init_tokens": 64})
'''


def _nan_cache(tmp_path, row):
    import numpy as np

    from saejax.cache import CacheWriter

    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    x[row, 3] = np.nan
    with CacheWriter(tmp_path / "acts", {"model": "toy"}, 16, shard_rows=500) as w:
        w.append(x)
        w.commit()
    exp = tmp_path / "nan.py"
    exp.write_text(NAN_EXPERIMENT % str(tmp_path / "acts"))
    return str(exp)


def test_nan_in_heldout_rows_is_found_before_training(capsys, tmp_path):
    out = tmp_path / "out"
    rc, lines = _run(capsys, [_nan_cache(tmp_path, 1950), "--out", str(out), "--no-progress"], tmp_path)
    assert rc == 2 and len(lines) == 1, lines
    assert "held-out row 1950" in lines[0] and str(tmp_path / "acts") in lines[0] and "shard_00003.npy row 450" in lines[0]
    assert not (out / "units").exists()  # nothing was trained first


def test_nan_in_training_rows_names_the_real_step(capsys, tmp_path):
    from saejax.data import epoch_indices

    row = 700  # the first batch (of the shared data order, seed 0) holding it is trained at this step:
    step = next(i for i, idx in enumerate(epoch_indices(1800, 64, seed=0), 1) if row in idx)
    assert step not in (120, 40, 80)  # neither the run's length nor a chunk boundary, so the message can't be right by chance
    rc, lines = _run(capsys, [_nan_cache(tmp_path, row), "--out", str(tmp_path / "out"), "--no-progress"], tmp_path)
    assert rc == 2 and len(lines) == 1, lines
    assert f"step {step})" in lines[0], lines[0]  # the step, not the steps left (was: "before step 120")
