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
