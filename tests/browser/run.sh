#!/usr/bin/env bash
# Run the dashboard's browser tests. Installs what they need first: Debian's Chromium (never a
# downloaded browser) and the pinned npm packages from package-lock.json.
#
#   tests/browser/run.sh                      # against the mock server, with the fixtures
#   ADAPTERLAB_URL=http://127.0.0.1:7860 ADAPTERLAB_TOKEN=… \
#   ADAPTERLAB_PREDICTIONS_A=a.jsonl ADAPTERLAB_PREDICTIONS_B=b.jsonl tests/browser/run.sh
#
# Extra arguments go to `node --test` (e.g. --test-name-pattern=compare).
set -euo pipefail
cd "$(dirname "$0")"

chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "error: no browser at $chromium; install Debian's chromium or set CHROMIUM_PATH" >&2
    exit 1
  fi
fi

if [[ ! -d node_modules/playwright-core || ! -d node_modules/axe-core ]]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

# Paths given relative to the caller's directory keep working after the cd above.
for var in ADAPTERLAB_PREDICTIONS_A ADAPTERLAB_PREDICTIONS_B ADAPTERLAB_ARTIFACTS; do
  if [[ -n "${!var:-}" && "${!var}" != /* ]]; then
    export "$var=$OLDPWD/${!var}"
  fi
done

exec node --test --test-concurrency=1 --test-reporter=spec "$@" dashboard.test.mjs unit.test.mjs
