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
