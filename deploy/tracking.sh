#!/bin/sh
# The team tracking server: PostgreSQL metadata, S3 artifacts behind MLflow's proxy,
# basic-auth with an admin created on first start, Host headers limited to our names.
# Needs (as Docker secrets, loaded by entrypoint.sh): POSTGRES_PASSWORD,
# MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY, AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY. Needs (environment): MLFLOW_HOST, MLFLOW_S3_ENDPOINT_URL.
set -eu
: "${POSTGRES_PASSWORD:?secret postgres_password is missing; run deploy/make-secrets.sh}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?secret mlflow_admin_password is missing; run deploy/make-secrets.sh}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?secret flask_secret_key is missing; run deploy/make-secrets.sh}"
: "${MLFLOW_HOST:?set MLFLOW_HOST in deploy/.env}"
db="postgresql+psycopg://mlflow:${POSTGRES_PASSWORD}@${POSTGRES_HOST:-postgres}:5432"

umask 077
config="${TMPDIR:-/tmp}/basic_auth.ini"
cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = ${db}/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
# The database URI holds the password: the environment, never an argument (`ps` shows those).
export MLFLOW_BACKEND_STORE_URI="${db}/mlflow"

exec python -m captchaops.stack.tracking \
  --artifacts-destination "s3://${S3_BUCKET:-breaking-captcha}/mlflow" \
  --app-name basic-auth \
  --allowed-hosts "${MLFLOW_HOST},tracking,tracking:5000,localhost,localhost:*,127.0.0.1,127.0.0.1:*" \
  --host 0.0.0.0 \
  --port 5000 \
  --workers "${TRACKING_WORKERS:-2}"
