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
