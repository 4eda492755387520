"""The one manifest schema every importer produces, and its validation.

A manifest is a list of `Utterance`s, sorted by id, ids unique. Every importer builds its rows
through `check_row`, so a bad value stops the run before any work with a `ManifestError` whose
message names where it is:

    <source> line <N>, column '<column>': <what is wrong>

Line numbers count the lines of the source file as a text editor does, with the header as line 1:
the first data row of a CSV is line 2, which is also the row number a spreadsheet shows for it.
Sources that are not line-oriented name their place in `source` itself ("manifest table row 3",
a RAVDESS file path) and leave the line out.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import astuple, dataclass, fields
from typing import Iterable, Mapping, Sequence

import pyarrow as pa

SPLITS = ("train", "development", "test", "test1", "test2", "test3", "unlabeled")
ATTRIBUTES = ("arousal", "dominance", "valence")
LABEL_MIN, LABEL_MAX = 1.0, 7.0
HASH_FORMAT = "deepemocluster-manifest/1"


class ManifestError(ValueError):
    """Message names the source (file), row and column."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # local path or URI (s3://, gs://, file://), absolute for local files
    split: str
    arousal: float | None = None
    dominance: float | None = None
    valence: float | None = None
    category: str | None = None
    speaker: str | None = None
    duration: float | None = None  # seconds, as the source claims (None when unknown)

    @property
    def labelled(self) -> bool:
        """All three attributes present."""
        return all(getattr(self, name) is not None for name in ATTRIBUTES)


COLUMNS = tuple(f.name for f in fields(Utterance))
REQUIRED_COLUMNS = ("id", "audio", "split")
OPTIONAL_COLUMNS = tuple(c for c in COLUMNS if c not in REQUIRED_COLUMNS)
TEXT_COLUMNS = ("id", "audio", "split", "category", "speaker")

SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=name not in REQUIRED_COLUMNS) for name in REQUIRED_COLUMNS]
    + [pa.field(name, pa.float64()) for name in ATTRIBUTES]
    + [pa.field("category", pa.string()), pa.field("speaker", pa.string()), pa.field("duration", pa.float64())]
)
assert tuple(SCHEMA.names) == COLUMNS


def place(source: str, line: int | None = None, column: str | None = None) -> str:
    """'file line 3, column 'x'' with the parts that are known."""
    text = source if line is None else f"{source} line {line}"
    return text if column is None else f"{text}, column '{column}'"


def manifest_error(source: str, line: int | None, column: str | None, what: str) -> ManifestError:
    return ManifestError(f"{place(source, line, column)}: {what}")


def check_columns(
    found: Sequence[str],
    source: str,
    required: Sequence[str],
    allowed: Sequence[str] | None = None,
    line: int | None = 1,
) -> None:
    """The header has every required column, no column twice and (when `allowed` is given) no other."""
    listing = ", ".join(found) if found else "none"
    for column in required:
        if column not in found:
            raise manifest_error(source, line, column, f"required column is missing; columns found: {listing}")
    repeated = sorted({c for c in found if list(found).count(c) > 1})
    if repeated:
        raise manifest_error(source, line, repeated[0], "the column appears more than once")
    if allowed is not None:
        unknown = [c for c in found if c not in allowed]
        if unknown:
            raise manifest_error(
                source, line, unknown[0],
                f"unknown column(s) {', '.join(map(repr, unknown))}; allowed columns: {', '.join(allowed)}",
            )


def unknown_split(value: object, known: Sequence[str] = SPLITS) -> str:
    return f"{value!r} is not a known split; known splits: {', '.join(known)}"


def _cell(value: object) -> object:
    """Text is stripped; empty text is 'no value' (None)."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _number(value: object, source: str, line: int | None, column: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise manifest_error(source, line, column, f"{value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise manifest_error(source, line, column, f"{value!r} is not a finite number")
    return number


def check_row(
    values: Mapping[str, object],
    source: str,
    line: int | None = None,
    columns: Mapping[str, str] | None = None,
) -> Utterance:
    """Parse and validate one row into an `Utterance`, or raise `ManifestError` naming source, line, column.

    `values` is keyed by `Utterance` field names (missing keys and empty cells are None); text cells are
    stripped, numbers may be given as text. `columns` maps a field to the column name as the source spells
    it (e.g. arousal -> EmoAct), so that the message names what the user sees in the file.
    Checks: id, audio and split present; split one of SPLITS; labels numbers in [LABEL_MIN, LABEL_MAX];
    duration a positive number of seconds.
    """
    named = dict(columns or {})
    column = lambda name: named.get(name, name)  # noqa: E731
    parsed: dict[str, object] = {}
    for name in COLUMNS:
        parsed[name] = _cell(values.get(name))
    for name in REQUIRED_COLUMNS:
        if parsed[name] is None:
            raise manifest_error(source, line, column(name), "empty; every row needs a value")
    for name in TEXT_COLUMNS:
        if parsed[name] is not None:
            parsed[name] = str(parsed[name])
    if parsed["split"] not in SPLITS:
        raise manifest_error(source, line, column("split"), unknown_split(parsed["split"]))
    for name in ATTRIBUTES:
        if parsed[name] is not None:
            label = _number(parsed[name], source, line, column(name))
            if not LABEL_MIN <= label <= LABEL_MAX:
                raise manifest_error(
                    source, line, column(name), f"{label:g} is outside the label range [{LABEL_MIN:g}, {LABEL_MAX:g}]"
                )
            parsed[name] = label
    if parsed["duration"] is not None:
        duration = _number(parsed["duration"], source, line, column("duration"))
        if duration <= 0:
            raise manifest_error(source, line, column("duration"), f"{duration:g} is not a positive number of seconds")
        parsed["duration"] = duration
    return Utterance(**parsed)  # type: ignore[arg-type]


def check_unique_ids(rows: Iterable[tuple[str, str]], what: str = "id") -> None:
    """`rows` are (id, place) pairs; raise on the first id seen twice, naming both places."""
    first: dict[str, str] = {}
    for key, where in rows:
        if key in first:
            raise ManifestError(f"{where}: duplicate {what} {key!r}; first at {first[key]}")
        first[key] = where


def merge_manifests(parts: Sequence[Sequence[Utterance]], names: Sequence[str] | None = None) -> list[Utterance]:
    """Concatenate the parts, sort by id; a duplicate id raises ManifestError naming both sources.

    `names` (one per part, e.g. "csv source data/a.csv") name the parts in messages; default "source N".
    """
    labels = list(names) if names is not None else [f"source {i + 1}" for i in range(len(parts))]
    if len(labels) != len(parts):
        raise ValueError(f"merge_manifests: {len(parts)} parts but {len(labels)} names")
    check_unique_ids(
        (row.id, f"{place(label, None, 'id')} (audio {row.audio})")
        for label, part in zip(labels, parts)
        for row in part
    )
    return sorted((row for part in parts for row in part), key=lambda row: row.id)


def manifest_table(rows: Iterable[Utterance]) -> pa.Table:
    """The manifest as an Arrow table with the fixed schema `SCHEMA` (one column per Utterance field)."""
    rows = list(rows)
    arrays = [pa.array([getattr(row, f.name) for row in rows], f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def manifest_from_table(table: pa.Table, source: str = "manifest table") -> list[Utterance]:
    """Rows of a table written by `manifest_table` (or any table with those columns), validated."""
    check_columns(table.column_names, source, REQUIRED_COLUMNS, COLUMNS, line=None)
    rows = [check_row(values, f"{source} row {index + 1}") for index, values in enumerate(table.to_pylist())]
    check_unique_ids((row.id, f"{source} row {index + 1}, column 'id'") for index, row in enumerate(rows))
    return rows


def listing_hash(rows: Iterable[Utterance]) -> str:
    """sha256 hex over the rows in id order, one canonical JSON line each; stable across runs and machines.

    It covers what each row says about an utterance (id, split, labels, category, speaker, duration) and
    not where its audio lives: the same corpus copied to another disk or bucket hashes the same.
    """
    digest = hashlib.sha256(HASH_FORMAT.encode() + b"\n")
    for row in sorted(rows, key=lambda row: row.id):
        values = [value for name, value in zip(COLUMNS, astuple(row)) if name != "audio"]
        digest.update(json.dumps(values, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode() + b"\n")
    return digest.hexdigest()
