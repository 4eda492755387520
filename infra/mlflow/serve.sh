#!/usr/bin/env bash
# The MLflow tracking server: runs, params and metrics in a database, artifacts in a folder or bucket
# that the server proxies (clients need no bucket credentials), bound to 127.0.0.1 unless told.
#
#   bash infra/mlflow/serve.sh          # sqlite + artifacts under ./mlflow-server/, http://127.0.0.1:5000
#
# Settings, all optional (the names mlflow server reads itself keep MLflow's meaning):
#   MLFLOW_HOST                   interface to bind; default 127.0.0.1. The cluster configs set the
#                                 head node's private IP so that training workers on other nodes reach it.
#   MLFLOW_PORT                   default 5000
#   MLFLOW_BACKEND_STORE_URI      default sqlite:///$MLFLOW_SERVER_DIR/mlflow.db; a shared server:
#                                 postgresql://USER@HOST:5432/mlflow?sslmode=require, without a password
#                                 (refused if it has one: it would show in `ps` and in the configs)
#   MLFLOW_DB_PASSWORD_SECRET     where the database password is, read at start into PGPASSWORD (which
#                                 libpq reads): aws-secretsmanager:ARN, gcp-secretmanager:projects/P/secrets/S
#                                 or file:PATH (a mounted Kubernetes Secret); see db_password.py
#   MLFLOW_ARTIFACTS_DESTINATION  default $MLFLOW_SERVER_DIR/artifacts; in the cloud s3://BUCKET/mlflow
#                                 or gs://BUCKET/mlflow (the server's machine needs access to it)
#   MLFLOW_WORKERS                server processes; default 1 on sqlite (one writer: no "database is
#                                 locked" between workers), 2 on a database server
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers the server answers (MLflow's default: localhost and
#                                 private IPs); set it when clients use a DNS name, e.g. a Kubernetes Service
#   MLFLOW_SERVER_DIR             where the default database and artifact folder live; default ./mlflow-server
#   MLFLOW_BIN                    the mlflow executable; default: mlflow on PATH
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (scorers); default false here:
#                                 tracking does not use it, and it is one process less
# Stays in the foreground (exec): stop it with Ctrl-C or by signalling its process.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
server_dir=$(mkdir -p "${MLFLOW_SERVER_DIR:-mlflow-server}" && cd "${MLFLOW_SERVER_DIR:-mlflow-server}" && pwd)
export MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
export MLFLOW_PORT=${MLFLOW_PORT:-5000}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# Passed through the environment, not the command line, so that the store's address stays out of `ps`.
export MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$server_dir/mlflow.db}
if [[ $MLFLOW_BACKEND_STORE_URI =~ ^[a-z0-9+]+://[^/@]*:[^/@]*@ ]]; then
  echo "serve.sh: MLFLOW_BACKEND_STORE_URI holds a password; drop it from the URI and set" \
       "MLFLOW_DB_PASSWORD_SECRET (or PGPASSWORD) instead" >&2
  exit 2
fi
if [[ -n ${MLFLOW_DB_PASSWORD_SECRET:-} ]]; then
  PGPASSWORD=$(python "$here/db_password.py" "$MLFLOW_DB_PASSWORD_SECRET")
  export PGPASSWORD
fi
case "$MLFLOW_BACKEND_STORE_URI" in
  sqlite:*) export MLFLOW_WORKERS=${MLFLOW_WORKERS:-1} ;;
  *) export MLFLOW_WORKERS=${MLFLOW_WORKERS:-2} ;;
esac
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$server_dir/artifacts}
case "$artifacts" in
  *://*) ;;
  *) mkdir -p "$artifacts" ;;
esac

echo "mlflow server on http://$MLFLOW_HOST:$MLFLOW_PORT (store ${MLFLOW_BACKEND_STORE_URI%%:*}," \
     "$MLFLOW_WORKERS worker(s), artifacts $artifacts)" >&2
exec "${MLFLOW_BIN:-mlflow}" server \
  --host "$MLFLOW_HOST" \
  --port "$MLFLOW_PORT" \
  --workers "$MLFLOW_WORKERS" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts
