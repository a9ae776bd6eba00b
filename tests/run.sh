#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (real SQLite files, a throwaway Postgres the
# tests start themselves, real sockets), the browser client's JS tests under node, the
# browser tests in headless Chromium, the benchmark scenarios at a tiny size (the Node `ws`
# baseline included) and their summary script (python3), promtool checks of the metrics and
# alert rules, the shipped nginx configuration in front of a server (with a certificate made
# by openssl), accessibility checks of every screen (axe-core from npm), and instruction
# counts under valgrind for the constant-time checks. Installs
# what a fresh Debian machine lacks when run as root; otherwise says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/bin/chromium ] || [ -n "${NANOCHAT_CHROMIUM:-}" ] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "missing: ${missing[*]} — install them (Debian: sudo apt-get install -y ${missing[*]})" >&2
        exit 1
    fi
fi

# The Node `ws` fan-out baseline's one package, pinned by its lock file (npm registry).
[ -d benches/node-ws/node_modules/ws ] ||
    npm ci --prefix benches/node-ws --no-audit --no-fund --loglevel=error
# axe-core, the accessibility checker the browser tests run inside the page, pinned likewise.
[ -f tests/a11y/node_modules/axe-core/axe.min.js ] ||
    npm ci --prefix tests/a11y --no-audit --no-fund --loglevel=error

cargo test --all-targets "$@"
