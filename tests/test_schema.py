"""The summary schema is the one place columns are declared."""

import json
from pathlib import Path

from saejax import schema, summary

ROOT = Path(__file__).parent.parent


def test_docs_page_is_generated_from_the_schema():
    assert (ROOT / "docs" / "columns.md").read_text() == schema.markdown()


def test_golden_records_are_declared_and_tables_name_declared_columns():
    for path in (ROOT / "tests" / "fixtures").glob("golden_*_summary.json"):
        for r in json.loads(path.read_text())["cells"]:
            schema.check_record(r)
    for name, _ in summary.TABLE + summary.DOWNSTREAM:
        assert schema.column(name) is not None, name


def test_undeclared_column_is_refused():
    import pytest

    from saejax.errors import ConfigError

    with pytest.raises(ConfigError, match="not declared"):
        schema.check_record({"pwmcc": 0.5, "pwmcc_typo": 1.0})


def test_findings_match_their_own_table():
    from saejax.findings import findings

    records = json.loads((ROOT / "tests" / "fixtures" / "golden_smoke_summary.json").read_text())["cells"]
    lines = findings(records)
    above = sum(r["pwmcc_ci_low"] > r["random_pwmcc"] for r in records)
    assert lines[0].startswith(f"- {above} of {len(records)} cells agree")
    best = max(records, key=lambda r: r["pwmcc_ratio"])
    assert f"`{best['cell']}`" in lines[1] and f"{best['pwmcc_ratio']:.2f}x" in lines[1]
    top7 = max(r["frac_ge_0.7"] for r in records)
    assert f"at most {100 * top7:.1f}% of latents" in lines[2]
    failed = findings([{"cell": "x", "status": "failed: 3 of 3 seeds"}] + records)
    assert failed[0].startswith("- 1 of 5 cells failed")


def test_findings_name_the_permutation_floor_and_the_analytic_test():
    from saejax.findings import findings

    base = {"pwmcc_ci_low": 0.2, "pwmcc_ci_high": 0.3, "random_pwmcc": 0.25, "pwmcc_ratio": 1.0,
            "n_seeds": 5, "n_random": 5, "p_value_resolution": 1 / 252}
    records = [dict(base, cell="a", pwmcc=0.31, p_value_vs_random=1 / 252, p_value_analytic=1e-9),
               dict(base, cell="b", pwmcc=0.26, p_value_vs_random=1 / 252, p_value_analytic=0.2),
               dict(base, cell="c", pwmcc=0.25, p_value_vs_random=0.5, p_value_analytic=0.6)]
    line = [s for s in findings(records) if "resolve only" in s][0]
    assert "down to 0.0040" in line and "2 of 3 cells sit at that floor" in line
    assert "puts 1 of them below 0.05/3" in line and "1.0e-09 to 2.0e-01" in line
