#!/usr/bin/env bash
# What infra/gcp/cluster.yaml runs in, made once per project (infra/README.md):
#   PROJECT=my-project BUCKET=my-bucket SSH_CIDR=203.0.113.7/32 bash infra/gcp/setup.sh > outputs/gcp-setup.env
# stdout: the KEY=VALUE lines that fill cluster.yaml's {{...}} placeholders (infra/render.py); progress on stderr.
#
# - A VPC of its own (the default network lets every VM in it reach every port): nodes tagged
#   $NAME talk to each other on any port, SSH reaches the head (tag $NAME-head) from SSH_CIDR only,
#   nothing else enters. Workers have no external IP: Private Google Access (Artifact Registry, GCS,
#   Secret Manager) and Cloud NAT for anything else outbound, e.g. the Deep Learning VM's first-boot
#   NVIDIA driver install.
# - Service accounts of their own. Ray's bootstrap still creates ray-autoscaler-sa-v1 with its
#   project-wide roles (ray/autoscaler/_private/gcp/config.py), but no node of cluster.yaml runs as
#   it. The head may create and delete instances and act as the worker account (the GCP form of
#   AWS's iam:PassRole); both pull from the Artifact Registry repository (tags immutable) and use
#   the bucket; only the head reads the database password.
# - Cloud SQL for Postgres on a private IP in that VPC, TLS only; its password is generated into
#   Secret Manager and handed from there to `gcloud sql users create`, never printed or written to a file.
# Creates resources: run it once. Needs gcloud (authenticated, with rights to create all of this) and openssl.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${BUCKET:?set BUCKET (name only)}" "${SSH_CIDR:?set SSH_CIDR, e.g. your IP/32}"
if [[ $SSH_CIDR == 0.0.0.0/0 ]]; then
  echo "setup.sh: SSH_CIDR must name your own addresses, not 0.0.0.0/0" >&2
  exit 2
fi
REGION=${REGION:-us-central1}
ZONE=${ZONE:-us-central1-a}
NAME=${NAME:-deepemocluster}
exec 3>&1 1>&2  # gcloud's output to stderr; stdout only carries the values
gcloud config set project "$PROJECT"

head_sa=$NAME-head@$PROJECT.iam.gserviceaccount.com
worker_sa=$NAME-worker@$PROJECT.iam.gserviceaccount.com
secret=$NAME-mlflow-db

gcloud services enable compute.googleapis.com artifactregistry.googleapis.com secretmanager.googleapis.com \
  sqladmin.googleapis.com servicenetworking.googleapis.com iam.googleapis.com

gcloud artifacts repositories create "$NAME" --repository-format=docker --location="$REGION" --immutable-tags

gcloud compute networks create "$NAME" --subnet-mode=custom
gcloud compute networks subnets create "$NAME" --network="$NAME" --region="$REGION" --range=10.42.0.0/20 \
  --enable-private-ip-google-access
gcloud compute firewall-rules create "$NAME-internal" --network="$NAME" --direction=INGRESS --action=ALLOW \
  --rules=all --source-tags="$NAME" --target-tags="$NAME"
gcloud compute firewall-rules create "$NAME-ssh" --network="$NAME" --direction=INGRESS --action=ALLOW \
  --rules=tcp:22 --source-ranges="$SSH_CIDR" --target-tags="$NAME-head"
gcloud compute routers create "$NAME" --network="$NAME" --region="$REGION"
gcloud compute routers nats create "$NAME" --router="$NAME" --region="$REGION" \
  --auto-allocate-nat-external-ips --nat-all-subnet-ip-ranges

gcloud iam service-accounts create "$NAME-head" --display-name="$NAME Ray head"
gcloud iam service-accounts create "$NAME-worker" --display-name="$NAME Ray workers"
gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$head_sa" \
  --role=roles/compute.instanceAdmin.v1 --condition=None
gcloud iam service-accounts add-iam-policy-binding "$worker_sa" --member="serviceAccount:$head_sa" \
  --role=roles/iam.serviceAccountUser
for sa in "$head_sa" "$worker_sa"; do
  gcloud artifacts repositories add-iam-policy-binding "$NAME" --location="$REGION" \
    --member="serviceAccount:$sa" --role=roles/artifactregistry.reader
  gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --member="serviceAccount:$sa" \
    --role=roles/storage.objectAdmin
done

gcloud compute addresses create "$NAME-sql" --global --purpose=VPC_PEERING --prefix-length=20 --network="$NAME"
gcloud services vpc-peerings connect --service=servicenetworking.googleapis.com --ranges="$NAME-sql" \
  --network="$NAME"
gcloud sql instances create "$NAME-mlflow" --database-version=POSTGRES_17 --edition=enterprise \
  --tier=db-g1-small --region="$REGION" --network="projects/$PROJECT/global/networks/$NAME" \
  --no-assign-ip --ssl-mode=ENCRYPTED_ONLY
gcloud sql databases create mlflow --instance="$NAME-mlflow"
openssl rand -hex 24 | tr -d '\n' | gcloud secrets create "$secret" --data-file=- --replication-policy=automatic
gcloud sql users create mlflow --instance="$NAME-mlflow" \
  --password="$(gcloud secrets versions access latest --secret="$secret")"
gcloud secrets add-iam-policy-binding "$secret" --member="serviceAccount:$head_sa" \
  --role=roles/secretmanager.secretAccessor
db_host=$(gcloud sql instances describe "$NAME-mlflow" --format='value(ipAddresses[0].ipAddress)')

cat >&3 <<EOF
Project=$PROJECT
Region=$REGION
Zone=$ZONE
Registry=$REGION-docker.pkg.dev
RepositoryUri=$REGION-docker.pkg.dev/$PROJECT/$NAME/$NAME
Subnetwork=projects/$PROJECT/regions/$REGION/subnetworks/$NAME
NodeTag=$NAME
HeadTag=$NAME-head
HeadServiceAccount=$head_sa
WorkerServiceAccount=$worker_sa
Bucket=$BUCKET
DbHost=$db_host
DbPasswordSecret=projects/$PROJECT/secrets/$secret
EOF
