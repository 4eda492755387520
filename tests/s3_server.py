"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1 (a PyPI package, no cloud).

    with s3_server(tmp_path, bucket="deepemo") as aws:   # the AWS_* variables that point at it
        environment.update(aws); pyarrow.fs.FileSystem.from_uri("s3://deepemo/...") ...

pyarrow (prep, training, Ray Train's checkpoints), boto3 (MLflow's artifact store) and the AWS CLI
conventions all read these variables; AWS_EC2_METADATA_DISABLED keeps every client from asking
the cloud's metadata address for credentials: the tests talk to this machine only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from mlflow_server import free_port


@contextlib.contextmanager
def s3_server(root: Path, bucket: str, timeout_s: float = 120.0) -> Iterator[dict[str, str]]:
    """Start the server with an empty `bucket`; yield the environment that points clients at it."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    log = root / "s3.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.25)
        _client(aws).create_bucket(Bucket=bucket)  # pyarrow will not create buckets
        yield aws
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _client(aws: dict[str, str]):
    """A boto3 S3 client of the server `aws` points at."""
    import boto3

    return boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], region_name=aws["AWS_DEFAULT_REGION"])


def bucket_keys(aws: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` in `bucket`."""
    keys = []
    for page in _client(aws).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def read_parquet(aws: dict[str, str], path: str):
    """The Parquet file at `path` (bucket/key) as an Arrow table, read through pyarrow's S3 client."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    endpoint = aws["AWS_ENDPOINT_URL"]
    fs = pafs.S3FileSystem(access_key=aws["AWS_ACCESS_KEY_ID"], secret_key=aws["AWS_SECRET_ACCESS_KEY"],
                           region=aws["AWS_DEFAULT_REGION"],
                           endpoint_override=endpoint.split("://", 1)[1], scheme=endpoint.split("://", 1)[0])
    return pq.read_table(path, filesystem=fs)
