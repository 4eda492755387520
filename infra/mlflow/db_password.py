"""Print the MLflow database password kept in a secret store (serve.sh reads it into PGPASSWORD).

    python infra/mlflow/db_password.py aws-secretsmanager:arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME
    python infra/mlflow/db_password.py gcp-secretmanager:projects/PROJECT/secrets/NAME[/versions/V]
    python infra/mlflow/db_password.py file:/var/run/secrets/mlflow-db/password

A secret holding JSON with a "password" key (what infra/aws/stack.yaml generates, with "username")
gives that key; any other secret is the password itself. Credentials are the machine's own: the head
node's instance profile or service account, or the pod's mounted Secret. Needs boto3 (AWS) or
google-auth (GCP), both in the cluster image.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path


def password_from_secret(value: str) -> str:
    value = value.strip()
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return parsed["password"] if isinstance(parsed, dict) else value


def read_aws(arn: str) -> str:
    import boto3

    region = arn.split(":")[3]
    return boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=arn)["SecretString"]


def read_gcp(name: str) -> str:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    if "/versions/" not in name:
        name += "/versions/latest"
    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    answer = AuthorizedSession(credentials).get(f"https://secretmanager.googleapis.com/v1/{name}:access", timeout=30)
    answer.raise_for_status()
    return base64.b64decode(answer.json()["payload"]["data"]).decode()


READERS = {"aws-secretsmanager": read_aws, "gcp-secretmanager": read_gcp, "file": lambda path: Path(path).read_text()}


def main(reference: str) -> str:
    kind, _, where = reference.partition(":")
    if kind not in READERS or not where:
        raise SystemExit(f"db_password.py: {reference!r} is not one of {', '.join(f'{k}:...' for k in READERS)}")
    return password_from_secret(READERS[kind](where))


if __name__ == "__main__":
    print(main(sys.argv[1]))
