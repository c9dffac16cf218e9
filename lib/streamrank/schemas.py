"""Table and suite definitions are data files under schemas/; this module only loads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pyspark.sql.types import StructType

from streamrank.config import REPO_ROOT
from streamrank.errors import ConfigError

SCHEMA_DIR = REPO_ROOT / "schemas"


@dataclass(frozen=True)
class TableSpec:
    """A table of DESIGN section 4: its name (`layer/table`), schema and partitioning."""

    name: str
    schema: StructType
    partition_by: tuple[str, ...]
    description: str

    @property
    def view_name(self) -> str:
        """The Spark SQL view name analysts use: `<layer>_<table>`."""
        return self.name.replace("/", "_")

    @property
    def data_columns(self) -> list[str]:
        return [f.name for f in self.schema.fields if f.name not in self.partition_by]


def _file_for(name: str) -> Path:
    return SCHEMA_DIR / "tables" / (name.replace("/", "_", 1) + ".json")


@cache
def table_spec(name: str) -> TableSpec:
    """Load `schemas/tables/<layer>_<table>.json` for a table named `layer/table`."""
    path = _file_for(name)
    if not path.exists():
        known = ", ".join(all_table_names())
        raise ConfigError(f"unknown table {name!r}: no schema file {path}; known tables: {known}")
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    schema = StructType.fromJson(doc["schema"])
    missing = [c for c in doc.get("partition_by", []) if c not in schema.fieldNames()]
    if missing:
        raise ConfigError(f"{path}: partition columns {missing} are not in the schema")
    return TableSpec(doc["table"], schema, tuple(doc.get("partition_by", [])), doc.get("description", ""))


def all_table_names() -> list[str]:
    """Every table the warehouse holds, as `layer/table`, sorted."""
    names = []
    for path in sorted((SCHEMA_DIR / "tables").glob("*.json")):
        with open(path, encoding="utf-8") as fh:
            names.append(json.load(fh)["table"])
    return names
