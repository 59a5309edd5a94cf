#!/usr/bin/env bash
# Managed by cognivern-infra. Installs the server-side release tool (run as root):
#
#   bash -c "$(cat lib.sh install-tool.sh)" install-tool < bundle
#
# stdin (components.tool.bundle of release_tool_files): the tool's files as text, each after a line
# "#--- PATH ---": its launcher cognivern-release and its package cognivern_release/*.py. Installed
# by lib.sh's install_release_tool (a digest-named directory, switched by rename; one line, "ok
# (already ...)" or "installed ..."). Nothing else on the host is touched: no package, no account,
# no process. Provisioning (python3, the accounts, ROOT) runs before it.
#
# Override (test hosts): COGNIVERN_BIN_DIR (/usr/local/bin).
# Sent after lib.sh (say/die/usage, parse_options, the validators, install_release_tool, unpack_bundle).
set -euo pipefail
umask 022

script_init install-tool "usage: install-tool  (the release tool's files on stdin, each after a line \"#--- PATH ---\")"
parse_options "" "$@"
bin_dir=${COGNIVERN_BIN_DIR:-/usr/local/bin}
require_abs_paths bin_dir
[ "$(id -u)" -eq 0 ] || die "must run as root (the program prefixes sudo -n for a non-root SSH user)"
/usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "the release tool needs Python 3.11 or newer (/usr/bin/python3)"

tmpdir=$(mktemp -d)
trap 'rm -rf -- "$tmpdir"' EXIT
bundle="$tmpdir/bundle"
mkdir -m 0700 "$bundle" "$bundle/cognivern_release"
[ -t 0 ] && die "no release tool on stdin"
unpack_bundle "$bundle" 'cognivern-release|cognivern_release/[a-z0-9_]+\.py' ||
    die "stdin is not a bundle of the release tool's files (lines \"#--- PATH ---\" before each)"
[ -s "$bundle/cognivern-release" ] || die "no launcher (cognivern-release) on stdin"
install_release_tool "$bundle" "$bin_dir"
