"""Catalog, schema and table names reach SQL (``DESCRIBE HISTORY``, ``MERGE INTO``) and the table
APIs only as checked Unity Catalog names, each part quoted with backticks: a name from a config
file or the bundle's environment cannot end the identifier or add to the statement."""

from __future__ import annotations

import shutil

import pytest

from lakevision.config import ConfigError, load_config
from lakevision.delta import table_version
from lakevision.runtime import IdentifierError, Runtime, TableRef, sql_name

from .conftest import CONFIG_DIR


class _RecordingSpark:
    """Just enough of a SparkSession to see the SQL a function sends."""

    def __init__(self):
        self.statements: list[str] = []

    def sql(self, statement: str):
        self.statements.append(statement)
        return self

    def first(self):
        return {"version": 7}


def test_uc_table_names_are_quoted_in_sql():
    rt = Runtime(config=load_config(CONFIG_DIR, "staging"), spark=None, kind="databricks")
    ref = rt.table("samples")
    assert ref.sql == "`main`.`lakevision_staging`.`samples`"
    spark = _RecordingSpark()
    assert table_version(spark, ref) == 7
    assert spark.statements == ["DESCRIBE HISTORY `main`.`lakevision_staging`.`samples` LIMIT 1"]
    assert sql_name("main.dev_a-b_lakevision.t") == "`main`.`dev_a-b_lakevision`.`t`"
    # a local table's path is quoted too, a backtick in it doubled
    assert TableRef("t", path="/data/odd`root/t").sql == "delta.`/data/odd``root/t`"


@pytest.mark.parametrize("name", ["main.lakevision`; DROP SCHEMA main.x; --.t", "main.a b.t", "main..t",
                                  "main.s.t.extra`"])
def test_a_name_that_is_not_an_identifier_is_refused(name):
    with pytest.raises(IdentifierError, match="is not a Unity Catalog name"):
        TableRef("t", full_name=name)


@pytest.mark.parametrize("field, value", [("schema", "lakevision`; DROP SCHEMA main.other; --"),
                                          ("catalog", "main.other"), ("volume", "raw/../../etc")])
def test_target_names_from_config_files_must_be_identifiers(tmp_path, field, value):
    cdir = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, cdir)
    text = (cdir / "targets.yaml").read_text()
    old = {"schema": "lakevision_dev", "catalog": "main", "volume": "raw"}[field]
    (cdir / "targets.yaml").write_text(text.replace(f"{field}: {old}\n", f"{field}: {value!r}\n", 1))
    with pytest.raises(ConfigError, match=rf"targets.yaml: targets.dev.{field}: .*is not a Unity Catalog name"):
        load_config(cdir, "dev")


def test_target_names_from_the_environment_must_be_identifiers(monkeypatch):
    monkeypatch.setenv("LAKEVISION_SCHEMA", "x` OR 1=1")
    with pytest.raises(ConfigError, match=r"schema: .*is not a Unity Catalog name"):
        load_config(CONFIG_DIR, "staging")
