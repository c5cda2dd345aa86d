#!/bin/sh
# Generate every password and key the compose stack needs, once, into deploy/secrets/
# (ignored by git). Nothing is shipped: each installation gets its own. The folder is 0700,
# so no other account on the host can read them; the files are 0644 because Compose mounts
# them as they are and the containers run as unprivileged users of their own.
# Re-running keeps existing files; delete one to rotate it (see docs/operations.md).
set -eu
cd "$(dirname "$0")"
umask 022
mkdir -p secrets
chmod 700 secrets

new() {
  # 48 hex characters: URL-safe (goes into database URLs), >= 12 characters (MLflow's rule)
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}
for name in postgres_password mlflow_admin_password flask_secret_key app_secret_key \
  service_password s3_secret_key; do
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
chmod 644 secrets/*
echo "secrets are in deploy/secrets/ (keep a copy with your backups)"
echo "MLflow admin password: deploy/secrets/mlflow_admin_password (user: admin)"
