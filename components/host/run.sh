#!/usr/bin/env bash
# Managed by cognivern-infra. Starts or reloads the app through PM2 with shared/.env exported
# (plain `source` would not export KEY=value lines to PM2) and drops PM2 apps that the
# ecosystem file no longer lists (e.g. the agent after agentsEnabled=false).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
ecosystem="$root/config/ecosystem.config.cjs"

if [ ! -e "$root/current" ]; then
    echo "run.sh: $root/current does not exist yet; nothing to start" >&2
    exit 0
fi

set -a
# shellcheck disable=SC1091
. "$root/shared/.env"
set +a

cd "$root/current"
pm2 startOrReload "$ecosystem" --update-env

wanted=$(node -e 'const c = require(process.argv[1]); for (const a of c.apps) console.log(a.name);' "$ecosystem")
while IFS= read -r running; do
    [ -n "$running" ] || continue
    if ! grep -qxF -- "$running" <<<"$wanted"; then
        pm2 delete "$running"
    fi
done < <(pm2 jlist | node -e 'let s = ""; process.stdin.on("data", d => s += d).on("end", () => { for (const p of JSON.parse(s)) console.log(p.name); });' | sort -u)
pm2 save --force >/dev/null
