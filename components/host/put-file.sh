#!/usr/bin/env bash
# Managed by cognivern-infra. Writes stdin to a file atomically (run as root):
#
#   bash -c "$(cat lib.sh put-file.sh)" put-file --dest PATH --mode MODE --owner USER[:GROUP] [--reload-root ROOT] < content
#
# The content may be a secret (shared/.env): it is never echoed and never placed in argv. The
# destination directory must be root's and writable by nobody else (the app is hostile: in a
# directory it could write, it could swap names under root); the temp file is written in a private
# root-only directory made inside it (same filesystem), gets its mode and owner there and is renamed
# into place (`mv -f`), so readers see either the old or the new file, never a partial one.
# Identical content with the right mode/owner: nothing happens ("unchanged").
#
# --reload-root ROOT: when the file changed and ROOT/current exists, reload the app with
#   `$BIN_DIR/cognivern-release --root ROOT reload` (BIN_DIR: COGNIVERN_BIN_DIR, default
#   /usr/local/bin; provisioning installs it). A failed reload, or none because the tool is missing,
#   leaves ROOT/.deploy/reload-pending behind; the next run retries the reload even when the content
#   is unchanged (otherwise a re-run would report success with the old settings live).
set -euo pipefail

script_init put-file "usage: put-file --dest ABS_PATH --mode MODE --owner USER[:GROUP] [--reload-root ABS_PATH]  (content on stdin)"
dest="" mode="" owner="" reload_root=""
parse_options "--dest --mode --owner --reload-root" "$@"
require_options dest mode owner
valid_abs_path "$dest" || die "--dest must be an absolute, normalised path, got '$dest'"
[[ $mode =~ ^0?[0-7]{3}$ ]] || die "--mode must be an octal mode such as 0600 or 644, got '$mode'"
user=${owner%%:*}
group=""
if [[ $owner == *:* ]]; then group=${owner#*:}; fi
valid_user "$user" || die "--owner user must be a Linux user name, got '$user'"
if [[ $owner == *:* ]] && ! valid_user "$group"; then
    die "--owner group must be a Linux group name, got '$group'"
fi
[ -z "$reload_root" ] || valid_abs_path "$reload_root" || die "--reload-root must be an absolute, normalised path, got '$reload_root'"
bin_dir=${COGNIVERN_BIN_DIR:-/usr/local/bin}
valid_abs_path "$bin_dir" || die "COGNIVERN_BIN_DIR must be an absolute, normalised path"

id -u "$user" >/dev/null 2>&1 || die "user $user does not exist"
if [ -z "$group" ]; then group=$(id -gn "$user"); fi
getent group "$group" >/dev/null || die "group $group does not exist"
dir=$(dirname "$dest")
[ -d "$dir" ] || die "directory $dir does not exist"
# Every directory from / down to the destination's must be root's and not writable by others.
bad=$(untrusted_dir "$dir")
[ -z "$bad" ] || die "$bad is not root's alone ($(describe_dir "$bad")); refusing to write $dest through it"
if [ -d "$dest" ]; then die "$dest is a directory"; fi
mode=$(printf '%o' "$((8#$mode))")

work=$(mktemp -d "$dir/.put-file.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
tmp="$work/content"
(umask 077 && cat >"$tmp")

pending=""
if [ -n "$reload_root" ] && [ -d "$reload_root/.deploy" ]; then pending="$reload_root/.deploy/reload-pending"; fi

if [ -f "$dest" ] && [ ! -L "$dest" ] && cmp -s "$tmp" "$dest" &&
    [ "$(stat -c '%a %U %G' "$dest")" = "$mode $user $group" ]; then
    if [ -z "$pending" ] || [ ! -e "$pending" ]; then
        say "$dest: unchanged"
        exit 0
    fi
    say "$dest: unchanged; retrying the reload that failed before"
else
    state=created
    if [ -e "$dest" ] || [ -L "$dest" ]; then state=updated; fi
    chown "$user:$group" "$tmp"
    chmod "$mode" "$tmp"
    [ -z "$pending" ] || : >"$pending"
    mv -f "$tmp" "$dest"
    say "$dest: $state (mode $mode, owner $user:$group)"
fi

[ -n "$reload_root" ] || exit 0
if [ ! -e "$reload_root/current" ]; then
    [ -z "$pending" ] || rm -f -- "$pending"
    say "reload: skipped ($reload_root/current does not exist yet)"
    exit 0
fi
tool="$bin_dir/cognivern-release"
[ -x "$tool" ] || die "reload failed: the release tool $tool is not installed (provisioning installs it); the next run retries it"
"$tool" --root "$reload_root" reload || die "reload failed ($tool --root $reload_root reload); the next run retries it"
[ -z "$pending" ] || rm -f -- "$pending"
say "reload: done with $tool"
