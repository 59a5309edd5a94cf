#!/usr/bin/env bash
# Managed by cognivern-infra. Starts or reloads the app through PM2 with shared/.env exported
# (plain `source` would not export KEY=value lines to PM2) and drops PM2 apps that the
# ecosystem file no longer lists (e.g. the agent after agentsEnabled=false, or a pre-flight app
# <APP_NAME>-preflight left behind by a cognivern-release that was killed) before `pm2 save`.
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

# PM2's daemon is the cluster primary. With Node's default round-robin it accepts connections and
# hands them to workers over IPC; during a reload it can hand one to a worker that is exiting, and
# that request hangs until the client gives up (measured: 5 stalls in 16 reloads under load; none
# in 46 with this). With "none" the workers accept from the shared socket themselves.
export NODE_CLUSTER_SCHED_POLICY=none
pid_file="${PM2_HOME:-$HOME/.pm2}/pm2.pid"
if [ -r "$pid_file" ] && daemon=$(cat "$pid_file") && [ -r "/proc/$daemon/environ" ] &&
    ! grep -qxz 'NODE_CLUSTER_SCHED_POLICY=none' "/proc/$daemon/environ"; then
    echo "run.sh: restarting the PM2 daemon once so that it uses NODE_CLUSTER_SCHED_POLICY=none" >&2
    pm2 update >/dev/null
fi

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
