"""Reading statement datasets and mapping their columns.

Entries of a split's `files`: a local .jsonl/.json/.parquet file (or a glob), `bundled:<name>` (the samples in
kimina_jax/data/bundled), a Hub dataset name, or a folder holding a downloaded copy of one (both read with
`datasets.load_dataset`).

Three column layouts (SPEC 5):
- `promptset` (AI-MO/Kimina-Prover-Promptset): `statement_id`, `natural_language`, `formal_statement`, `source`.
- `minif2f` (AI-MO/minif2f_test, DeepSeek-Prover's minif2f.jsonl): `name`, `informal_prefix`, `formal_statement`,
  optional `header`. The informal problem is `informal_prefix` verbatim, doc-comment markers included, exactly
  as the original recipe's prepare_data.py renames it. When a `header` column is present and the statement has
  no imports of its own, the header is prepended (the Hub copy's statements already include it).
- `numina` (AI-MO/NuminaMath-LEAN and ../shared/data/train_sample.jsonl): `uuid`, `problem`, `formal_statement`,
  `source`.
A missing informal problem (null) stays None; the prompt renders it as the literal text `None`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Any, Iterator

from kimina_jax.config import DatasetConfig, read_text
from kimina_jax.errors import KiminaError

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).parent / "bundled"
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class Columns:
    statement_id: str
    problem: str
    formal_statement: str
    source: str | None = None  # column holding data_source; absent: the dataset's name
    header: str | None = None  # column holding an import header to prepend


LAYOUTS = {
    "promptset": Columns("statement_id", "natural_language", "formal_statement", source="source"),
    "minif2f": Columns("name", "informal_prefix", "formal_statement", header="header"),
    "numina": Columns("uuid", "problem", "formal_statement", source="source"),
}


@dataclasses.dataclass(frozen=True)
class StatementRow:
    """One dataset row after column mapping; `origin` is `file:line` (or `file row N`) for error messages."""

    statement_id: str
    problem: str | None
    formal_statement: str
    data_source: str
    origin: str


def detect_layout(columns: set[str], origin: str) -> str:
    """The layout whose distinguishing columns are present."""
    if "natural_language" in columns:
        return "promptset"
    if "informal_prefix" in columns:
        return "minif2f"
    if "problem" in columns and "uuid" in columns:
        return "numina"
    columns_of = {name: ", ".join(c for c in dataclasses.astuple(cols) if c) for name, cols in LAYOUTS.items()}
    wanted = "; ".join(f"{name}: {cols}" for name, cols in columns_of.items())
    raise KiminaError(f"{origin}: cannot tell the column layout from columns {sorted(columns)}; expected: {wanted}")


def read_rows(cfg: DatasetConfig, key: str = "data") -> list[StatementRow]:
    """All rows of one split (files in order), filtered by `where`, cut to `limit`, columns mapped."""
    if not cfg.files:
        raise KiminaError(f"'{key}.files' is empty: name at least one dataset file or Hub dataset")
    default_source = cfg.name or _dataset_name(cfg.files[0])
    rows: list[StatementRow] = []
    for entry in cfg.files:
        for record, origin in _records(entry, cfg.hub_split):
            if not _matches(record, cfg.where, origin):
                continue
            layout = cfg.layout if cfg.layout != "auto" else detect_layout(set(record), origin)
            rows.append(_map_row(record, LAYOUTS[layout], layout, default_source, origin))
            if cfg.limit is not None and len(rows) >= cfg.limit:
                return rows
    return rows


def column_names(entry: str, hub_split: str = "train") -> set[str]:
    """The columns of the first row of one `files` entry (empty when it has no rows)."""
    for record, _ in _records(entry, hub_split):
        return set(record)
    return set()


def _dataset_name(entry: str) -> str:
    """`AI-MO/minif2f_test` -> `minif2f_test`; `data/train.parquet` -> `train`."""
    if entry.startswith(BUNDLED_PREFIX):
        entry = entry[len(BUNDLED_PREFIX) :]
    name = entry.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _LOCAL_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _matches(record: dict, where: dict[str, str], origin: str) -> bool:
    for column, expected in where.items():
        if column not in record:
            raise KiminaError(f"{origin}: 'where' names column '{column}', which this row does not have")
        if str(record[column]) != expected:
            return False
    return True


def _map_row(record: dict, cols: Columns, layout: str, default_source: str, origin: str) -> StatementRow:
    for column in (cols.statement_id, cols.problem, cols.formal_statement):
        if column not in record:
            raise KiminaError(f"{origin}: missing column '{column}' (layout '{layout}')")
    statement_id = record[cols.statement_id]
    if isinstance(statement_id, bool) or not isinstance(statement_id, (str, int)):
        raise KiminaError(f"{origin}: '{cols.statement_id}' must be a string or int, got {statement_id!r}")
    statement = record[cols.formal_statement]
    if not isinstance(statement, str) or not statement.strip():
        raise KiminaError(f"{origin}: '{cols.formal_statement}' must be a non-empty string, got {statement!r}")
    problem = record[cols.problem]
    if problem is not None and not isinstance(problem, str):
        raise KiminaError(f"{origin}: '{cols.problem}' must be a string or null, got {problem!r}")
    if cols.header and record.get(cols.header):
        header = record[cols.header]
        if not isinstance(header, str):
            raise KiminaError(f"{origin}: '{cols.header}' must be a string, got {header!r}")
        if not statement.lstrip().startswith("import"):
            statement = header + statement
    source = record.get(cols.source) if cols.source else None
    if source is not None and not isinstance(source, str):
        raise KiminaError(f"{origin}: '{cols.source}' must be a string, got {source!r}")
    return StatementRow(str(statement_id), problem, statement, source or default_source, origin)


# ---------------------------------------------------------------------------------------------- sources
def _records(entry: str, hub_split: str) -> Iterator[tuple[dict, str]]:
    if entry.startswith(BUNDLED_PREFIX):
        path = BUNDLED_DIR / entry[len(BUNDLED_PREFIX) :]
        if not path.exists():
            available = ", ".join(sorted(p.name for p in BUNDLED_DIR.glob("*.jsonl")))
            raise KiminaError(f"bundled dataset '{entry}' does not exist; bundled files: {available}")
        yield from _local_records(path)
        return
    if any(ch in entry for ch in "*?["):
        paths = sorted(glob.glob(entry))
        if not paths:
            raise KiminaError(f"dataset pattern '{entry}' matches no file")
        for path in paths:
            yield from _local_records(Path(path))
        return
    path = Path(entry)
    if path.is_file():
        yield from _local_records(path)
    elif path.is_dir() or not (path.suffix in _LOCAL_SUFFIXES or entry.startswith((".", "/", "~"))):
        yield from _dataset_records(entry, hub_split)  # a Hub name, or a downloaded copy of a Hub dataset
    else:
        raise KiminaError(f"dataset file '{entry}' does not exist")


def _local_records(path: Path) -> Iterator[tuple[dict, str]]:
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    if path.suffix not in (".jsonl", ".json"):
        raise KiminaError(f"dataset file '{path}': unsupported format (use .jsonl, .json or .parquet)")
    text = read_text(path, "dataset file")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KiminaError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
        for i, record in enumerate(records):
            yield _object(record, f"{path} record {i}"), f"{path} record {i}"
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KiminaError(f"{origin}: not valid JSON: {exc.msg} (column {exc.colno})") from exc
        yield _object(record, origin), origin


def _object(record: Any, origin: str) -> dict:
    if not isinstance(record, dict):
        raise KiminaError(f"{origin}: a row must be a JSON object, got {type(record).__name__}")
    return record


def _parquet_records(path: Path) -> Iterator[tuple[dict, str]]:
    import datasets  # deferred: importing datasets takes a second

    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise KiminaError(f"dataset file '{path}': cannot read as parquet: {exc}") from exc
    for i, record in enumerate(table):
        yield record, f"{path} row {i + 1}"


def _dataset_records(name: str, split: str) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise KiminaError(
            f"cannot load dataset '{name}' (split '{split}') from the Hugging Face Hub or that folder: {exc}. "
            "Without Hub access, download it elsewhere and point the config's files at local parquet/jsonl files."
        ) from exc
    for i, record in enumerate(table):
        yield record, f"{name}[{split}] row {i + 1}"
