#!/usr/bin/env bash
# CI step for the PostgreSQL tests (issue #17): make the server binaries (initdb, postgres) available.
# The tests start and stop their own throwaway server (darwin_hydra/testing/postgres.py); nothing is
# started here. Idempotent: does nothing when a server is already installed. Installing needs root.
set -euo pipefail

# Same lookup as darwin_hydra.testing.postgres.find_bin_dir: `postgres` on PATH with initdb beside it,
# else Debian's /usr/lib/postgresql/<version>/bin, newest first.
find_server() {
    local dir on_path
    if on_path=$(command -v postgres); then
        dir=$(dirname "$(readlink -f "$on_path")")
        [[ -x $dir/initdb ]] && { echo "$dir/postgres"; return 0; }
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x $dir/postgres && -x $dir/initdb ]] && { echo "$dir/postgres"; return 0; }
    done
    return 1
}

if server=$(find_server); then
    echo "ci_postgres: already installed: $("$server" --version)"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "ci_postgres: no PostgreSQL server found and no apt-get here: install one (initdb, postgres) by hand" >&2
    exit 1
fi
start=$SECONDS
apt_log=$(mktemp)
trap 'rm -f "$apt_log"' EXIT
# Quiet unless it fails (dpkg and invoke-rc.d chatter on stderr even with -qq).
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends postgresql; } >"$apt_log" 2>&1; then
    cat "$apt_log" >&2
    echo "ci_postgres: apt-get install postgresql failed (output above)" >&2
    exit 1
fi
if ! server=$(find_server); then
    echo "ci_postgres: apt-get installed postgresql but no server binary (initdb, postgres) was found" >&2
    exit 1
fi
echo "ci_postgres: installed $("$server" --version) with apt-get in $((SECONDS - start)) s"
