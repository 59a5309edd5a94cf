#!/bin/sh
# Managed by cognivern-infra. Lets only root reach Hetzner's metadata service (169.254.169.254).
#
#   cognivern-metadata-filter [--best-effort]
#
# The metadata service hands the server's user data, which holds its SSH host key, to any local
# process that asks, the app included. Run on every boot by cognivern-metadata-filter.service
# (before network-pre.target; PM2's unit requires it, so the app never starts first) and, on a
# server's first boot, by cloud-init's bootcmd (before that unit is installed). Idempotent and
# atomic: the nft table is replaced in one transaction, so a re-run never leaves a moment without
# the rule. Without nft or iptables it fails (exit 1), or with --best-effort (bootcmd: a first
# boot must not fail) warns and exits 0; provisioning installs nftables before it enables the unit.
set -eu
if command -v nft >/dev/null 2>&1; then
    nft -f - <<'NFT'
table inet cognivern_metadata
delete table inet cognivern_metadata
table inet cognivern_metadata {
    chain output {
        type filter hook output priority 0; policy accept;
        ip daddr 169.254.169.254 meta skuid != 0 reject
    }
}
NFT
elif command -v iptables >/dev/null 2>&1; then
    iptables -C OUTPUT -d 169.254.169.254 -m owner ! --uid-owner 0 -j REJECT 2>/dev/null ||
        iptables -I OUTPUT -d 169.254.169.254 -m owner ! --uid-owner 0 -j REJECT
else
    echo 'cognivern-metadata-filter: no nft or iptables: the metadata service stays readable by every local user' >&2
    [ "${1:-}" = --best-effort ]
fi
