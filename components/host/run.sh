#!/usr/bin/env bash
# Managed by cognivern-infra. Starts or reloads the app through PM2 with shared/.env exported
# (plain `source` would not export KEY=value lines to PM2) and drops PM2 apps that the
# ecosystem file no longer lists (e.g. the agent after agentsEnabled=false, a slot the slots file
# empties, or the single app <APP_NAME> of a host from before the blue/green slots) before
# `pm2 save`. At boot and on `reload` that is the live slot, the warm one if kept, and the agent.
#   run.sh [--only NAME[,NAME...]]   only start or reload those apps (cognivern-release starts one
#                                    slot, or moves the agent, this way)
set -euo pipefail

only=()
if [ "${1:-}" = --only ]; then
    [[ ${2:-} =~ ^[A-Za-z0-9][A-Za-z0-9._,-]*$ ]] || { echo "run.sh: --only needs app names" >&2; exit 2; }
    only=(--only "$2")
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
ecosystem="$root/config/ecosystem.config.cjs"

if [ ! -e "$root/current" ] && [ "${#only[@]}" -eq 0 ]; then
    echo "run.sh: $root/current does not exist yet; nothing to start" >&2
    exit 0
fi

# PM2's daemon is the cluster primary. With Node's default round-robin it accepts connections and
# hands them to workers over IPC; during a reload it can hand one to a worker that is exiting, and
# that request hangs until the client gives up (measured: 5 stalls in 16 reloads under load; none
# in 46 with this). With "none" the workers accept from the shared socket themselves.
export NODE_CLUSTER_SCHED_POLICY=none
pm2_home=${PM2_HOME:-$HOME/.pm2}

# PM2 spawns its daemon in the caller's working directory: from one the app user cannot enter
# (root's home over SSH) the spawn fails with EACCES and no daemon starts at all.
cd "$root"

# The God daemon(s) of this PM2_HOME: processes titled "PM2 vX: God Daemon" with PM2_HOME in their
# environment (PM2 always puts it there), plus the one pm2.pid names. The pid file alone is not
# enough: PM2 writes it once at start and removes it on exit whatever pid it then holds
# (lib/Daemon.js), so it goes stale after a SIGKILL and missing when two daemons ever shared a
# PM2_HOME; reading only it kept a round-robin daemon silently.
is_god() { grep -qsz '^PM2 v[0-9.]*: God Daemon' "/proc/$1/cmdline" && [ -r "/proc/$1/environ" ]; }
god_pids() {
    local file pid
    {
        while IFS= read -r file; do
            pid=${file#/proc/} && pid=${pid%/cmdline}
            if grep -qsxzF -- "PM2_HOME=$pm2_home" "/proc/$pid/environ"; then echo "$pid"; fi
        done < <(grep -lsz '^PM2 v[0-9.]*: God Daemon' /proc/[0-9]*/cmdline || true)
        if pid=$(cat "$pm2_home/pm2.pid" 2>/dev/null) && [[ "$pid" =~ ^[0-9]+$ ]] && is_god "$pid"; then echo "$pid"; fi
    } | sort -un
}

round_robin_daemons() {
    local pid
    for pid in $(god_pids); do
        if ! grep -qxzF NODE_CLUSTER_SCHED_POLICY=none "/proc/$pid/environ" 2>/dev/null; then echo "$pid"; fi
    done
}

if [ -n "$(round_robin_daemons)" ]; then
    echo "run.sh: restarting the PM2 daemon once so that it uses NODE_CLUSTER_SCHED_POLICY=none" >&2
    pm2 update >/dev/null
    left=$(round_robin_daemons)
    if [ -n "$left" ]; then
        echo "run.sh: PM2 daemon(s) $(echo "$left" | tr '\n' ' ')for $pm2_home still run without NODE_CLUSTER_SCHED_POLICY=none after pm2 update; stop them (pm2 kill as the app user) and run again" >&2
        exit 1
    fi
fi

# The daemon is started (or replaced) above, before shared/.env is exported: a daemon spawned by
# the startOrReload below would inherit the app's variables, secrets included, into its environment.
# When one already listens, `pm2 ping` (0.2-1 s of CPU, PM2's whole CLI) is skipped.
if [ -z "$(god_pids)" ] || [ ! -S "$pm2_home/rpc.sock" ]; then
    pm2 ping >/dev/null
fi
set -a
# shellcheck disable=SC1091
. "$root/shared/.env"
set +a
pm2 startOrReload "$ecosystem" "${only[@]}" --update-env
# One app started on purpose (cognivern-release: a slot, the agent): it saves PM2's list itself
# once the activation settles; the clean-up below is for the full start at boot or on reload.
[ "${#only[@]}" -eq 0 ] || exit 0

wanted=$(node -e 'const c = require(process.argv[1]); for (const a of c.apps) console.log(a.name);' "$ecosystem")
while IFS= read -r running; do
    [ -n "$running" ] || continue
    if ! grep -qxF -- "$running" <<<"$wanted"; then
        pm2 delete "$running"
    fi
done < <(pm2 jlist | node -e 'let s = ""; process.stdin.on("data", d => s += d).on("end", () => { for (const p of JSON.parse(s)) console.log(p.name); });' | sort -u)
pm2 save --force >/dev/null
