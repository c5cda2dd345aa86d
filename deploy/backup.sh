#!/bin/sh
# Back up a running compose stack into one encrypted file, deploy/backups/<UTC time>.tar.gpg,
# a tar archive of:
#   mlflow.dump, mlflow_auth.dump   PostgreSQL custom-format dumps (runs, registry, users)
#   bucket/                         every object of the artifact bucket
#   secrets/, .env                  deploy/secrets and deploy/.env (needed to restore),
#                                   all but backup_passphrase
# encrypted with gpg (AES-256, symmetric, integrity-checked) under deploy/secrets/
# backup_passphrase, which no backup holds: keep a copy apart (a password manager), or no
# backup can be opened. Nothing leaves the private staging folder unencrypted, and that
# folder is removed on exit, whatever happens.
# The database goes first, the bucket second: an artifact written in between is kept, and
# nothing the dump refers to is missing. Set BACKUP_GCS=gs://bucket/prefix to copy the file
# off the machine (needs gcloud and write access to that bucket). Restore: docs/operations.md.
set -eu
cd "$(dirname "$0")"
command -v gpg > /dev/null || { echo "gpg is missing: sudo apt-get install gnupg" >&2; exit 1; }
passphrase=secrets/backup_passphrase
[ -s "$passphrase" ] || { echo "$passphrase is missing; run deploy/make-secrets.sh" >&2; exit 1; }
compose="docker compose -f compose.yaml"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
umask 077
mkdir -p backups
out="backups/$stamp.tar.gpg"
work=$(mktemp -d "backups/.staging-$stamp.XXXXXX")
trap 'rm -rf "$work" "$work.tar" "$out.part"' EXIT
trap 'exit 1' INT TERM HUP
mkdir "$work/bucket" "$work/secrets"

for db in mlflow mlflow_auth; do
  $compose exec -T postgres pg_dump -U mlflow -Fc "$db" > "$work/$db.dump"
done

RCLONE_S3_ACCESS_KEY_ID=$(cat secrets/s3_access_key)
RCLONE_S3_SECRET_ACCESS_KEY=$(cat secrets/s3_secret_key)
export RCLONE_S3_ACCESS_KEY_ID RCLONE_S3_SECRET_ACCESS_KEY
docker run --rm --network captchaops_storage --user "$(id -u):$(id -g)" \
  -e RCLONE_S3_PROVIDER=SeaweedFS -e RCLONE_S3_ENDPOINT=http://seaweedfs:8333 \
  -e RCLONE_S3_ACCESS_KEY_ID -e RCLONE_S3_SECRET_ACCESS_KEY \
  -v "$PWD/$work/bucket:/backup" \
  rclone/rclone:1.71.2 copy :s3:breaking-captcha /backup

for file in secrets/*; do
  [ "$file" = "$passphrase" ] || cp -p "$file" "$work/secrets/"
done
[ ! -f .env ] || cp -p .env "$work/.env"

tar -C "$work" -cf "$work.tar" .
gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-file "$passphrase" \
  --symmetric --cipher-algo AES256 --s2k-digest-algo SHA512 --s2k-mode 3 \
  --s2k-count 65011712 --output "$out.part" "$work.tar"
mv "$out.part" "$out"
echo "backup written to deploy/$out ($(du -h "$out" | cut -f1)), encrypted"

if [ -n "${BACKUP_GCS:-}" ]; then
  gcloud storage cp "$out" "$BACKUP_GCS/"
  echo "copied to $BACKUP_GCS/$stamp.tar.gpg"
fi
