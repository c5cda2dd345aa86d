#!/bin/sh
# Container entry point: export each Docker secret /run/secrets/NAME whose NAME is an
# environment variable name (CAPTCHAOPS_TRACKING_PASSWORD, POSTGRES_PASSWORD, ...) as that
# variable, then run the command. Secrets never sit in the compose file or in `docker inspect`.
set -eu
secrets="${SECRETS_DIR:-/run/secrets}"
if [ -d "$secrets" ]; then
  for file in "$secrets"/*; do
    [ -f "$file" ] || continue
    name=$(basename "$file")
    case "$name" in
      [[:upper:]_]*) ;;
      *) continue ;;
    esac
    case "$name" in
      *[![:upper:][:digit:]_]*) continue ;;
    esac
    export "$name=$(cat "$file")"
  done
fi
exec "$@"
