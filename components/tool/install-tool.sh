#!/usr/bin/env bash
# Managed by cognivern-infra. Installs the server-side release tool and its PM2 query helper (run as root):
#
#   bash -c "$(cat lib.sh install-tool.sh)" install-tool < bundle
#
# stdin: the release tool, then a line "#--- cognivern-pm2.cjs ---" and the helper. The tool goes to
# $BIN_DIR/cognivern-release (0755), the helper beside it (0644), each only when it differs, and each
# by rename: a bash script replaced in place breaks a run of it that is under way (an activation).
# One line per file, "ok (already ...)" or "installed ...". Nothing else on the host is touched:
# no package, no account, no process.
#
# Override (test hosts): COGNIVERN_BIN_DIR (/usr/local/bin).
# Sent after lib.sh (say/die/usage, parse_options, the validators).
set -euo pipefail
umask 022

script_init install-tool "usage: install-tool  (the release tool, a marker line and its PM2 helper on stdin)"
parse_options "" "$@"
bin_dir=${COGNIVERN_BIN_DIR:-/usr/local/bin}
require_abs_paths bin_dir
[ "$(id -u)" -eq 0 ] || die "must run as root (the program prefixes sudo -n for a non-root SSH user)"

tmpdir=$(mktemp -d)
trap 'rm -rf -- "$tmpdir"' EXIT
awk -v tool="$tmpdir/tool" -v helper="$tmpdir/helper" '$0 == "#--- cognivern-pm2.cjs ---" { h = 1; next }
    { print > (h ? helper : tool) }'
[ -s "$tmpdir/tool" ] || die "no release tool on stdin"
[ -s "$tmpdir/helper" ] || die "no PM2 helper on stdin (after a line '#--- cognivern-pm2.cjs ---')"
[ "$(head -c 2 "$tmpdir/tool")" = '#!' ] || die "the release tool on stdin does not start with #!"

install_file() { # source destination mode label
    local src=$1 dst=$2 mode=$3 label=$4 tmp
    if [ -f "$dst" ] && [ ! -L "$dst" ] && [ "$(stat -c '%U:%G %a' "$dst")" = "root:root ${mode#0}" ] && cmp -s "$src" "$dst"; then
        say "$label: ok (already $dst)"
        return
    fi
    install -d -m 0755 "$bin_dir"
    tmp=$(mktemp "$bin_dir/.$(basename "$dst").XXXXXX")
    cat "$src" >"$tmp"
    chown root:root "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dst"
    say "$label: installed $dst"
}
install_file "$tmpdir/tool" "$bin_dir/cognivern-release" 0755 "release tool"
install_file "$tmpdir/helper" "$bin_dir/cognivern-pm2.cjs" 0644 "release tool helper"
