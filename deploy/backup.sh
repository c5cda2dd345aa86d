#!/bin/sh
# Back up a running compose stack into deploy/backups/<UTC time>/:
#   mlflow.dump, mlflow_auth.dump   PostgreSQL custom-format dumps (runs, registry, users)
#   bucket/                         every object of the artifact bucket
#   secrets.tar                     deploy/secrets and deploy/.env (needed to restore)
# The database goes first, the bucket second: an artifact written in between is kept, and
# nothing the dump refers to is missing. Set BACKUP_GCS=gs://bucket/prefix to copy it off
# the machine (needs gcloud and write access to that bucket). See docs/operations.md.
set -eu
cd "$(dirname "$0")"
compose="docker compose -f compose.yaml"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="backups/$stamp"
umask 077
mkdir -p "$out/bucket"

for db in mlflow mlflow_auth; do
  $compose exec -T postgres pg_dump -U mlflow -Fc "$db" > "$out/$db.dump"
done

RCLONE_S3_ACCESS_KEY_ID=$(cat secrets/s3_access_key)
RCLONE_S3_SECRET_ACCESS_KEY=$(cat secrets/s3_secret_key)
export RCLONE_S3_ACCESS_KEY_ID RCLONE_S3_SECRET_ACCESS_KEY
docker run --rm --network captchaops_default --user "$(id -u):$(id -g)" \
  -e RCLONE_S3_PROVIDER=SeaweedFS -e RCLONE_S3_ENDPOINT=http://seaweedfs:8333 \
  -e RCLONE_S3_ACCESS_KEY_ID -e RCLONE_S3_SECRET_ACCESS_KEY \
  -v "$PWD/$out/bucket:/backup" \
  rclone/rclone:1.71.2 copy :s3:breaking-captcha /backup

tar -cf "$out/secrets.tar" secrets .env
echo "backup written to deploy/$out ($(du -sh "$out" | cut -f1))"

if [ -n "${BACKUP_GCS:-}" ]; then
  gcloud storage cp --recursive "$out" "$BACKUP_GCS/"
  echo "copied to $BACKUP_GCS/$stamp"
fi
