#!/bin/sh
# Generate every password and key the compose stack needs, once, into deploy/secrets/
# (ignored by git). Nothing is shipped: each installation gets its own. The folder is 0700,
# so no other account on the host can read them; the files are 0644 because Compose mounts
# them as they are and the containers run as unprivileged users of their own.
# Re-running keeps existing files; delete one to rotate it (see docs/operations.md).
#
#   postgres_superuser_password  `postgres`, used only by the postgres container to initialise
#   postgres_password            the `mlflow` role (no superuser; owns mlflow, mlflow_auth)
#   seaweedfs_security.toml      SeaweedFS's JWT signing keys: its master, volume server and
#                                filer accept writes and filer reads only when signed
#   backup_passphrase            encrypts deploy/backup.sh's files; never inside a backup:
#                                keep a copy apart (a password manager)
#   promotion_key(.pub)          the Ed25519 promotion key that signs alias moves (needs
#                                openssl): the `train` service gets both halves, the model
#                                servers only promotion_key.pub
set -eu
cd "$(dirname "$0")"
umask 022
mkdir -p secrets
chmod 700 secrets

new() {
  # 48 hex characters: URL-safe (goes into database URLs), >= 12 characters (MLflow's rule)
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}
for name in postgres_superuser_password postgres_password mlflow_admin_password \
  flask_secret_key app_secret_key service_password promotions_password s3_secret_key \
  backup_passphrase; do
  if [ ! -s "secrets/$name" ]; then
    new > "secrets/$name"
    echo "created deploy/secrets/$name"
  fi
done
[ -s secrets/s3_access_key ] || printf 'captchaops' > secrets/s3_access_key

# SeaweedFS reads its S3 identities from a JSON file: one identity, full rights on its buckets.
cat > secrets/seaweedfs_s3.json <<JSON
{
  "identities": [
    {
      "name": "captchaops",
      "credentials": [
        {"accessKey": "$(cat secrets/s3_access_key)", "secretKey": "$(cat secrets/s3_secret_key)"}
      ],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
JSON

# SeaweedFS's components sign what they ask of each other (10-second JWTs): the master signs
# volume writes, the S3 gateway signs filer writes and reads. Unsigned requests from anything
# else on the storage network are refused. jwt.signing.read stays unset: the filer cannot
# sign volume reads.
if [ ! -s secrets/seaweedfs_security.toml ]; then
  cat > secrets/seaweedfs_security.toml <<TOML
[jwt.signing]
key = "$(new)"
expires_after_seconds = 10

[jwt.filer_signing]
key = "$(new)"
expires_after_seconds = 10

[jwt.filer_signing.read]
key = "$(new)"
expires_after_seconds = 10

[access]
ui = false
TOML
  echo "created deploy/secrets/seaweedfs_security.toml"
fi

# The promotion key signs every alias move (the gate, promote, rollback, canaries); model
# servers follow only moves its public half verifies. Made once; the public half is derived.
if [ ! -s secrets/promotion_key ]; then
  if ! command -v openssl >/dev/null 2>&1; then
    echo "make-secrets.sh: the promotion key needs openssl; install it and run this again" >&2
    exit 1
  fi
  openssl genpkey -algorithm ed25519 -out secrets/promotion_key
  echo "created deploy/secrets/promotion_key"
fi
openssl pkey -in secrets/promotion_key -pubout -out secrets/promotion_key.pub

chmod 644 secrets/*
echo "secrets are in deploy/secrets/ (backups hold them, encrypted, except the passphrase)"
echo "copy deploy/secrets/backup_passphrase somewhere apart: without it no backup opens"
echo "MLflow admin password: deploy/secrets/mlflow_admin_password (user: admin)"

