"""Copy a Ray node's logs to a bucket as they grow, so they outlive the node when the autoscaler
removes it (a pod deleted, an instance terminated) and the cluster when it is torn down.

    python infra/logs/ship_logs.py /tmp/ray s3://BUCKET/logs/CLUSTER/NODE [--every 30] [--once]

Every `--every` seconds, each file under <ray temp dir>/session_*/logs that is new or changed since
its last copy goes to <destination>/<session>/<path in logs/>; SIGTERM (a pod or container stopping)
triggers a last pass before exit. The destination is anything pyarrow opens (s3://, gs://, a local
folder), with the machine's own credentials. A node killed without SIGTERM loses at most the last
interval.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
from pathlib import Path

import pyarrow.fs as pafs

from data_prep.storage import open_filesystem


def sessions(ray_dir: Path) -> list[Path]:
    return sorted(p for p in ray_dir.glob("session_*") if p.is_dir() and not p.is_symlink())


def ship_once(ray_dir: Path, destination: tuple[pafs.FileSystem, str], shipped: dict[Path, tuple[int, int]]) -> int:
    """Copy the new or changed log files to `destination` (`open_filesystem`'s filesystem and
    root); the number copied. `shipped` remembers (size, mtime)."""
    filesystem, root = destination
    copied = 0
    for session in sessions(ray_dir):
        logs = session / "logs"
        for path in sorted(p for p in logs.rglob("*") if p.is_file()):
            try:
                stat = path.stat()
            except FileNotFoundError:  # Ray rotated or removed it meanwhile
                continue
            state = (stat.st_size, stat.st_mtime_ns)
            if shipped.get(path) == state:
                continue
            target = f"{root.rstrip('/')}/{session.name}/{path.relative_to(logs).as_posix()}"
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(path, "rb") as source, filesystem.open_output_stream(target) as sink:
                shutil.copyfileobj(source, sink, 2**20)
            shipped[path] = state
            copied += 1
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ray_dir", type=Path, help="Ray's temp dir (default of `ray start`: /tmp/ray)")
    parser.add_argument("destination", help="s3://..., gs://... or a folder")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between passes")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)

    destination = open_filesystem(args.destination)
    shipped: dict[Path, tuple[int, int]] = {}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while True:
        try:
            ship_once(args.ray_dir, destination, shipped)
        except OSError as err:  # a bucket hiccup: the next pass retries what was not copied
            print(f"ship_logs: {err}", file=sys.stderr, flush=True)
        if args.once or stop.is_set():
            return
        stop.wait(args.every)


if __name__ == "__main__":
    main()
