"""Importers: a corpus release, a CSV or a folder of audio -> one validated manifest.

Each importer returns `list[Utterance]` sorted by id, ids unique, every row checked by
`manifest.check_row`; a mistake raises `ManifestError` naming the file, the line and the column (see
`data_prep.manifest` for the line convention: the header is line 1).

Locations are local paths or URIs (s3://, gs://, file://, ...) opened with pyarrow's filesystems, so
an s3:// CSV or folder reads the same way as a local one. Local audio paths are stored absolute; URIs
keep their scheme. A relative path inside a CSV or listing is relative to that file's folder.
The audio files themselves are not opened here: a missing or broken file is the prep job's
per-file reject, not a manifest error.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import quote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import soundfile

from data_prep.manifest import (
    COLUMNS,
    REQUIRED_COLUMNS,
    SPLITS,
    ManifestError,
    Utterance,
    check_columns,
    check_row,
    check_unique_ids,
    manifest_error,
    merge_manifests,
    place,
    unknown_split,
)
from data_prep.storage import open_filesystem


def _audio_extensions() -> frozenset[str]:
    """File endings of the formats this libsndfile reads (RAW left out: it needs its format spelled out)."""
    formats = {name.lower() for name in soundfile.available_formats()} - {"raw"}
    if "ogg" in formats:
        formats |= {"opus", "oga"}
    if "aiff" in formats:
        formats.add("aif")
    return frozenset(formats)


AUDIO_EXTENSIONS = _audio_extensions()


# --- locations ----------------------------------------------------------------------------------


def _is_uri(location: str) -> bool:
    return "://" in location


def resolve(entry: str, folder: str) -> str:
    """A path or URI written in a source -> an absolute local path or a URI.

    A relative path is taken relative to `folder` (a local folder or a URI); below a URI its characters
    are percent-encoded, since the entry is a path and not a URI.
    """
    if _is_uri(entry):
        return entry
    entry = os.path.expanduser(entry)
    if os.path.isabs(entry):
        return os.path.normpath(entry)
    if _is_uri(folder):
        parts = urlsplit(folder)
        path = posixpath.normpath(posixpath.join(parts.path or "/", quote(entry.replace(os.sep, "/"))))
        return urlunsplit(parts._replace(path=path))
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(folder)), entry))


def _parent(location: str) -> str:
    if _is_uri(location):
        parts = urlsplit(location)
        return urlunsplit(parts._replace(path=posixpath.dirname(parts.path.rstrip("/"))))
    return os.path.dirname(os.path.abspath(os.path.expanduser(location)))


@dataclass(frozen=True)
class _Location:
    """A local path (made absolute) or a URI (as given), with the pyarrow filesystem that reads it."""

    location: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def open(cls, location: str) -> "_Location":
        try:
            fs, path = open_filesystem(location)
        except (pa.ArrowException, OSError, ValueError) as error:
            raise ManifestError(f"{location}: cannot open: {error}") from error
        return cls(location if _is_uri(location) else path, fs, path)

    def child(self, relative: str) -> "_Location":
        return _Location.open(resolve(relative, self.location))

    def type(self) -> pafs.FileType:
        try:
            return self.fs.get_file_info(self.path).type
        except (pa.ArrowException, OSError) as error:
            raise ManifestError(f"{self.location}: cannot read: {error}") from error

    def require(self, *types: pafs.FileType, what: str) -> pafs.FileType:
        found = self.type()
        if found not in types:
            state = "does not exist" if found == pafs.FileType.NotFound else f"is not {what}"
            raise ManifestError(f"{self.location}: {state}; expected {what}")
        return found

    def read_text(self) -> str:
        self.require(pafs.FileType.File, what="a file")
        try:
            with self.fs.open_input_stream(self.path) as handle:
                data = handle.read()
        except (pa.ArrowException, OSError) as error:
            raise ManifestError(f"{self.location}: cannot read: {error}") from error
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            raise manifest_error(self.location, line, None, f"not UTF-8 text ({error.reason})") from None

    def audio_files(self) -> list[str]:
        """Paths (POSIX, relative to this folder) of the audio files below it, recursively, sorted.

        Hidden files and folders (a name starting with '.', such as macOS '._x.wav') are left out.
        Whatever else is named like audio but is no readable file (a dangling link, a folder named
        x.wav) is listed too: prep then records it in rejects.parquet with its reason, not nothing.
        """
        self.require(pafs.FileType.Directory, what="a folder")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        except (pa.ArrowException, OSError) as error:
            raise ManifestError(f"{self.location}: cannot list: {error}") from error
        prefix = self.path.rstrip("/") + "/"
        found = []
        for info in infos:
            relative = info.path[len(prefix):] if info.path.startswith(prefix) else info.base_name
            if info.extension.lower() in AUDIO_EXTENSIONS and not any(part.startswith(".") for part in relative.split("/")):
                found.append(relative)
        if isinstance(self.fs, pafs.LocalFileSystem):  # pyarrow's listing leaves dangling links out
            found += [r for r in _dangling_links(self.path) if posixpath.splitext(r)[1][1:].lower() in AUDIO_EXTENSIONS
                      and not any(part.startswith(".") for part in r.split("/"))]
        return sorted(set(found))


def _dangling_links(root: str) -> list[str]:
    """POSIX paths, relative to `root`, of the symbolic links below it whose target is missing."""
    found = []
    for folder, folders, files in os.walk(root):
        for name in files + folders:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not os.path.exists(path):
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return found


def _read_csv(source: _Location) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line, {column: cell text})]) of a CSV file; blank rows are skipped.

    Read with the csv module over the text fetched through pyarrow's filesystem: every cell stays text
    (an id '0001' keeps its zeros) and `line` is the file's line where the row starts, header = line 1.
    """
    reader = csv.reader(io.StringIO(source.read_text(), newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise manifest_error(source.location, 1, None, "no header line (the file is empty)")
        rows = []
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise manifest_error(
                    source.location, line, None, f"{len(cells)} cells, but the header has {len(header)} columns"
                )
            rows.append((line, dict(zip(header, cells))))
    except csv.Error as error:
        raise manifest_error(source.location, reader.line_num, None, f"not readable as CSV: {error}") from None
    return header, rows


def _manifest(entries: Sequence[tuple[Utterance, str]], source: str) -> list[Utterance]:
    """(row, where it came from) pairs -> the manifest sorted by id; duplicate ids or no rows raise."""
    if not entries:
        raise ManifestError(f"{source}: no utterances found")
    check_unique_ids((row.id, where) for row, where in entries)
    return sorted((row for row, _ in entries), key=lambda row: row.id)


# --- MSP-Podcast --------------------------------------------------------------------------------

MSP_LABELS = "Labels/labels_consensus.csv"
MSP_AUDIO = "Audios"
MSP_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
MSP_SPLITS = {"Train": "train", "Development": "development", "Test1": "test1", "Test2": "test2", "Test3": "test3"}
# Utterance field -> the MSP-Podcast column it comes from (so messages name the release's column).
MSP_FIELDS = {
    "id": "FileName", "audio": "FileName", "split": "Split_Set", "arousal": "EmoAct", "valence": "EmoVal",
    "dominance": "EmoDom", "category": "EmoClass", "speaker": "SpkrID",
}


def import_msp_podcast(root: str, include_unlabeled: bool = False) -> list[Utterance]:
    """An MSP-Podcast release: `root/Labels/labels_consensus.csv` and the audio in `root/Audios/`.

    id = FileName without its extension. With `include_unlabeled`, audio files in Audios/ that the CSV
    does not list join as split 'unlabeled'. Gender is not part of the manifest.
    """
    base = _Location.open(root)
    labels, audios = base.child(MSP_LABELS), base.child(MSP_AUDIO)
    header, records = _read_csv(labels)
    check_columns(header, labels.location, MSP_COLUMNS)
    check_unique_ids(
        ((cells["FileName"].strip(), place(labels.location, line, "FileName")) for line, cells in records),
        what="FileName",
    )
    entries = []
    for line, cells in records:
        split = cells["Split_Set"].strip()
        if split not in MSP_SPLITS:
            raise manifest_error(labels.location, line, "Split_Set", unknown_split(split, tuple(MSP_SPLITS)))
        name = cells["FileName"].strip()
        values = {field: cells[column] for field, column in MSP_FIELDS.items()}
        values.update(id=posixpath.splitext(name)[0], audio=resolve(name, audios.location) if name else "",
                      split=MSP_SPLITS[split])
        entries.append((check_row(values, labels.location, line, MSP_FIELDS), place(labels.location, line, "FileName")))
    if include_unlabeled:
        listed = {cells["FileName"].strip() for _, cells in records}
        for relative in audios.audio_files():
            if relative not in listed:
                values = {"id": posixpath.splitext(relative)[0], "audio": resolve(relative, audios.location),
                          "split": "unlabeled"}
                entries.append((check_row(values, audios.location), f"{audios.location}/{relative}"))
    return _manifest(entries, base.location)


# --- RAVDESS ------------------------------------------------------------------------------------

# NRC VAD Lexicon entries (valence, arousal, dominance in [0, 1]) of the RAVDESS category words.
RAVDESS_VAD = {
    "neutral": (0.469, 0.184, 0.357),
    "calm": (0.875, 0.100, 0.282),
    "happy": (1.000, 0.735, 0.772),
    "sad": (0.225, 0.333, 0.149),
    "angry": (0.167, 0.865, 0.657),
    "fearful": (0.073, 0.840, 0.293),
    "disgust": (0.052, 0.775, 0.317),
    "surprised": (0.875, 0.875, 0.562),
}
RAVDESS_EMOTIONS = {f"{code:02d}": word for code, word in enumerate(RAVDESS_VAD, start=1)}
RAVDESS_EXTENSIONS = ("flac", "wav")
# The seven fields of MM-VV-EE-II-SS-RR-AA and the codes each may take.
RAVDESS_NAME_FIELDS = {
    "modality (MM)": ("03",),
    "vocal channel (VV)": ("01",),
    "emotion (EE)": tuple(RAVDESS_EMOTIONS),
    "intensity (II)": ("01", "02"),
    "statement (SS)": ("01", "02"),
    "repetition (RR)": ("01", "02"),
    "actor (AA)": tuple(f"{actor:02d}" for actor in range(1, 25)),
}
RAVDESS_SPLITS = (("train", range(1, 17)), ("development", range(17, 21)), ("test", range(21, 25)))


def ravdess_labels(emotion: str, strong: bool) -> dict[str, float]:
    """Attributes on the 1-7 scale: strong intensity takes the category's row, normal the midpoint with
    neutral; score = 1 + 6 * value (the convention in data/ravdess16k/README.md)."""
    row, neutral = RAVDESS_VAD[emotion], RAVDESS_VAD["neutral"]
    values = row if strong else tuple((a + b) / 2 for a, b in zip(row, neutral))
    return {name: 1 + 6 * value for name, value in zip(("valence", "arousal", "dominance"), values)}


def _ravdess_row(folder: str, relative: str) -> Utterance:
    path = resolve(relative, folder)
    stem = posixpath.splitext(posixpath.basename(relative))[0]

    def wrong(field: str, what: str) -> ManifestError:
        return ManifestError(f"{path}, field '{field}': {what}")

    codes = stem.split("-")
    if len(codes) != len(RAVDESS_NAME_FIELDS):
        raise wrong("file name", f"{stem!r} does not have the seven two-digit fields MM-VV-EE-II-SS-RR-AA")
    for (field, allowed), code in zip(RAVDESS_NAME_FIELDS.items(), codes):
        if code not in allowed:
            raise wrong(field, f"{code!r} is not one of {', '.join(allowed)}")
    _, _, emotion, intensity, _, _, actor = codes
    if emotion == "01" and intensity == "02":
        raise wrong("intensity (II)", "02 (strong) with emotion 01 (neutral): neutral has normal intensity only")
    folder_name = posixpath.basename(posixpath.dirname(relative))
    match = re.fullmatch(r"Actor_(\d+)", folder_name)
    if match and int(match.group(1)) != int(actor):
        raise wrong("actor (AA)", f"actor {actor} in the name, but the file is in folder {folder_name}")
    split = next(name for name, actors in RAVDESS_SPLITS if int(actor) in actors)
    word = RAVDESS_EMOTIONS[emotion]
    values = {"id": stem, "audio": path, "split": split, "category": word, "speaker": f"Actor_{actor}",
              **ravdess_labels(word, strong=intensity == "02")}
    return check_row(values, path)


def import_ravdess(root: str) -> list[Utterance]:
    """RAVDESS speech: `Actor_XX/MM-VV-EE-II-SS-RR-AA.flac` (or .wav) below `root`, id = the name's stem.

    Labels by the NRC-VAD convention (`ravdess_labels`); split by actor: 01-16 train,
    17-20 development, 21-24 test. A name off the convention raises ManifestError naming file and field.
    """
    base = _Location.open(root)
    files = [f for f in base.audio_files() if posixpath.splitext(f)[1][1:].lower() in RAVDESS_EXTENSIONS]
    return _manifest([(_ravdess_row(base.location, f), resolve(f, base.location)) for f in files], base.location)


# --- generic CSV --------------------------------------------------------------------------------


def import_csv(path: str, base_dir: str | None = None) -> list[Utterance]:
    """A CSV with the manifest's columns: id, audio, split required; arousal, dominance, valence,
    category, speaker, duration optional (an empty cell is no value). Any other column is rejected:
    a misspelt optional column would otherwise be silently ignored. Relative audio paths are resolved
    against `base_dir`, or the CSV's folder."""
    source = _Location.open(path)
    header, records = _read_csv(source)
    check_columns(header, source.location, REQUIRED_COLUMNS, COLUMNS)
    folder = _parent(source.location) if base_dir is None else resolve(base_dir, os.getcwd())
    entries = []
    for line, cells in records:
        audio = cells["audio"].strip()
        values = {**cells, "audio": resolve(audio, folder) if audio else ""}
        entries.append((check_row(values, source.location, line), place(source.location, line, "id")))
    return _manifest(entries, source.location)


# --- folder or listing --------------------------------------------------------------------------


def import_folder(path: str, split: str = "unlabeled") -> list[Utterance]:
    """Every audio file below a folder (recursively), or every entry of a .txt listing, as `split`.

    Audio = the endings in AUDIO_EXTENSIONS (what libsndfile reads); id = the path relative to the
    folder with POSIX separators and the extension, so a.wav and a.flac stay apart. A listing has one
    path or URI per line (blank lines and lines starting with '#' are skipped; relative paths are
    relative to the listing's folder); its id is the line as written.
    """
    source = _Location.open(path)
    if split not in SPLITS:
        raise ManifestError(f"folder source {source.location}, field 'split': {unknown_split(split)}")
    found = source.require(pafs.FileType.Directory, pafs.FileType.File, what="a folder or a .txt listing")
    if found == pafs.FileType.File:
        if not source.path.lower().endswith(".txt"):
            raise ManifestError(f"{source.location}: expected a folder or a .txt listing, not this file")
        return _import_listing(source, split)
    entries = [
        (check_row({"id": relative, "audio": resolve(relative, source.location), "split": split}, source.location),
         f"{source.location}/{relative}")
        for relative in source.audio_files()
    ]
    return _manifest(entries, f"{source.location} (audio endings: {', '.join(sorted(AUDIO_EXTENSIONS))})")


def _import_listing(source: _Location, split: str) -> list[Utterance]:
    folder = _parent(source.location)
    entries = []
    for line, text in enumerate(source.read_text().splitlines(), start=1):
        entry = text.strip()
        if entry and not entry.startswith("#"):
            values = {"id": entry, "audio": resolve(entry, folder), "split": split}
            entries.append((check_row(values, source.location, line), place(source.location, line)))
    return _manifest(entries, source.location)


# --- several sources ----------------------------------------------------------------------------


@dataclass
class SourceSpec:
    kind: str  # "msp_podcast" | "ravdess" | "csv" | "folder"
    path: str
    split: str = "unlabeled"  # used by kind=folder


IMPORTERS: dict[str, Callable[[str], list[Utterance]]] = {
    "msp_podcast": import_msp_podcast,
    "ravdess": import_ravdess,
    "csv": import_csv,
    "folder": import_folder,
}


def build_manifest(sources: Sequence[SourceSpec]) -> list[Utterance]:
    """Import every source and merge them: one manifest sorted by id, ids unique across sources.

    Takes SourceSpec or anything with .kind, .path and .split (such as config.SourceConfig).
    """
    parts, names = [], []
    for index, spec in enumerate(sources):
        where = f"sources[{index}]"
        if spec.kind not in IMPORTERS:
            raise ManifestError(f"{where}, field 'kind': {spec.kind!r} is not one of {', '.join(IMPORTERS)}")
        if spec.kind == "folder":
            parts.append(import_folder(spec.path, spec.split))
        elif spec.split != "unlabeled":
            raise ManifestError(
                f"{where} ({spec.kind} {spec.path}), field 'split': only kind 'folder' takes a split; "
                f"a {spec.kind} source carries its own"
            )
        else:
            parts.append(IMPORTERS[spec.kind](spec.path))
        names.append(f"{spec.kind} source {spec.path}")
    return merge_manifests(parts, names)
