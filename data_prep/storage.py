"""Where a prepared dataset lives: a local folder or a URI, through pyarrow's filesystems.

Every file is written to a temporary name and then moved into place, so a reader (or a resumed
run) never sees half a file.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def open_filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def read_bytes(location: str) -> bytes:
    if "://" not in location:
        return Path(location).read_bytes()
    fs, path = open_filesystem(location)
    with fs.open_input_file(path) as handle:
        return handle.read()


def copy_folder(source: str, destination: str) -> None:
    """Copy a local folder to a local path or a URI (s3://, gs://, file://), replacing what is there."""
    filesystem, path = open_filesystem(destination)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(source, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)


def download_folder(source: str, destination: str) -> None:
    """Copy a folder at a local path or a URI into the local folder `destination`."""
    filesystem, path = open_filesystem(source)
    pafs.copy_files(path, destination, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())


@dataclass
class OutputFolder:
    """The root of one prepared dataset."""

    location: str

    def __post_init__(self) -> None:
        self.fs, self.root = open_filesystem(self.location)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def uri(self, name: str) -> str:
        """What another process (a Ray worker, a reader) opens: the location plus the name."""
        return f"{self.location.rstrip('/')}/{name}"

    def make(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def list(self, prefix: str = "") -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.base_name.startswith(prefix))

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))

    def _write_atomically(self, name: str, write) -> None:
        temporary = self.path(f".tmp-{uuid.uuid4().hex}-{name}")
        write(temporary)
        self.fs.move(temporary, self.path(name))

    def write_json(self, name: str, value: object) -> None:
        data = (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()

        def write(path: str) -> None:
            with self.fs.open_output_stream(path) as handle:
                handle.write(data)

        self._write_atomically(name, write)

    def read_json(self, name: str) -> dict:
        """The JSON file `name`; one that does not parse is a `ValueError` naming the file."""
        with self.fs.open_input_file(self.path(name)) as handle:
            text = handle.read()
        try:
            return json.loads(text)
        except ValueError as error:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{self.uri(name)} is not valid JSON: {error}") from error

    def write_parquet(self, name: str, table: pa.Table, compression: str, small_columns: list[str] | None = None) -> None:
        """`small_columns`: the only columns given dictionary encoding and statistics (None: all)."""
        codec = None if compression == "none" else compression
        options = {} if small_columns is None else {"use_dictionary": small_columns, "write_statistics": small_columns}

        def write(path: str) -> None:
            pq.write_table(table, path, filesystem=self.fs, compression=codec, **options)

        self._write_atomically(name, write)

    def remove_temporaries(self) -> None:
        for name in self.list(".tmp-"):
            self.delete(name)
