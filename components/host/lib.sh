#!/usr/bin/env bash
# Managed by cognivern-infra. What the host scripts (provision.sh, put-file.sh, nginx-site.sh,
# tls.sh) share. components.remote.script_command puts this file in front of each script, so
# every command still travels whole (`bash -c '<lib.sh><script>' NAME ARGS...`, nothing to install
# first) and an edit here shows in `pulumi preview --diff` as a change to every command that uses
# it. Only definitions: each script starts with `script_init NAME USAGE`.
set -euo pipefail

script_init() { # name usage: the word every message starts with, and the usage text
    prog=$1
    usage_text=$2
}
say() { printf '%s: %s\n' "$prog" "$*"; }
warn() { printf '%s: warning: %s\n' "$prog" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 1
}
usage() {
    printf '%s\n' "$usage_text" >&2
    exit 2
}
usage_error() { # message: a wrong command line (exit 2, with the usage)
    printf '%s: %s\n' "$prog" "$1" >&2
    usage
}

# parse_options "--opt-a --opt-b" "$@": each `--opt-b VALUE` sets the variable opt_b (the script
# gives each its empty value first); -h/--help prints the usage; anything else is refused.
parse_options() {
    local known=" $1 " var
    shift
    while [ "$#" -gt 0 ]; do
        case "$1" in
            -h | --help) usage ;;
        esac
        [[ $known == *" $1 "* && $1 == --* ]] || usage_error "unknown argument: $1"
        [ "$#" -ge 2 ] || usage_error "$1 needs a value"
        var=${1#--}
        printf -v "${var//-/_}" '%s' "$2"
        shift 2
    done
}
require_options() { # var...: each must have been given (--var-name)
    local var
    for var; do
        [ -n "${!var}" ] || usage_error "--${var//_/-} is required"
    done
}

# ---------------------------------------------------------------------------- validators
# The rules are the program's (components/release/cognivern_release/facts.py): components.remote puts
# them in front of this file as generated COGNIVERN_* variables, so no script holds a copy.
valid_abs_path() { [[ $1 =~ $COGNIVERN_ABS_PATH_RE ]]; }  # absolute, normalised (no //, ., .., trailing /), not "/"
valid_user() { [[ $1 =~ $COGNIVERN_USER_RE ]]; }
valid_site_name() { [[ $1 =~ $COGNIVERN_SITE_NAME_RE ]]; } # what render.site_name makes of an app name
system_path() { # a system tree (or inside one), or one of the shared parents itself: never a root
    local dir
    for dir in "${COGNIVERN_SYSTEM_TREES[@]}"; do
        if [ "$1" = "$dir" ] || [[ $1 == "$dir"/* ]]; then return 0; fi
    done
    for dir in "${COGNIVERN_SYSTEM_PARENTS[@]}"; do
        if [ "$1" = "$dir" ]; then return 0; fi
    done
    return 1
}
# untrusted_dir DIR: the first directory from DIR up to / that is a link, not root's, or writable
# by its group or by others (sticky or not, so /tmp, /var/tmp and /dev/shm count); nothing when
# root alone controls the whole chain. Whoever can write a directory on the way can create or swap
# the names under it, so a root-run step never works below such a directory (provision.sh: ROOT's
# parents; put-file.sh: the destination's directory).
untrusted_dir() {
    local check=$1 uid mode
    while :; do
        if [ -L "$check" ] || [ ! -d "$check" ]; then
            printf '%s\n' "$check"
            return 0
        fi
        read -r uid mode < <(stat -c '%u %a' "$check")
        if [ "$uid" != 0 ] || (((8#$mode & 8#022) != 0)); then
            printf '%s\n' "$check"
            return 0
        fi
        [ "$check" != / ] || return 0
        check=$(dirname "$check")
    done
}
describe_dir() { stat -c 'owner %U, mode %a' "$1" 2>/dev/null || echo missing; } # for messages about untrusted_dir's answer
require_abs_paths() { # var...: each variable's value must be an absolute, normalised path
    local var
    for var; do
        valid_abs_path "${!var}" || die "$var must be an absolute, normalised path, got '${!var}'"
    done
}

# ---------------------------------------------------------------------------- apt
apt_try() { # apt-get ARGS, non-interactive; its output kept in apt_output
    apt_output=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold -y -q "$@" 2>&1)
}
apt_get() { # apt-get ARGS; on failure its output, then die naming the step
    apt_try "$@" || {
        printf '%s\n' "$apt_output" >&2
        die "apt-get $* failed"
    }
}
apt_install() { # package...: the local package lists first (fast when fresh); refreshed only if that fails
    apt_try install "$@" || {
        apt_get update
        apt_get install "$@"
    }
}

# ---------------------------------------------------------------------------- nginx
nginx_args_for() { # conf [prefix]: the -c/-p every nginx call of the script uses (run_nginx)
    nginx_args=(-c "$1")
    [ -z "${2:-}" ] || nginx_args+=(-p "$2")
}
run_nginx() { nginx "${nginx_args[@]}" "$@"; }
# nginx_reload [start]: reload nginx (systemctl when systemd runs, else nginx -s reload with
# nginx_args); when it is not running, start it with `start`, else leave it. Sets nginx_action
# (read it as ${nginx_action:?}).
# shellcheck disable=SC2034 # nginx_action is the calling script's
nginx_reload() {
    local output
    if [ -d /run/systemd/system ]; then
        if systemctl is-active --quiet nginx; then
            systemctl reload nginx
            nginx_action="reloaded nginx"
        elif [ "${1:-}" = start ]; then
            systemctl start nginx
            nginx_action="started nginx"
        else
            nginx_action="nginx not running"
        fi
    elif nginx "${nginx_args[@]}" -s reload >/dev/null 2>&1; then
        nginx_action="reloaded nginx"
    elif [ "${1:-}" = start ]; then
        # No running master (no pid file or a stale one): start it.
        if ! output=$(nginx "${nginx_args[@]}" 2>&1); then
            printf '%s\n' "$output" >&2
            die "nginx is not running and could not be started"
        fi
        nginx_action="started nginx"
    else
        nginx_action="nginx not running"
    fi
}

# ---------------------------------------------------------------------------- the release tool
# unpack_bundle DIR NAMES: stdin's files into DIR, each after a line "#--- PATH ---" whose PATH
# matches the extended regex NAMES (anchored); a marker outside it, or text before the first marker,
# fails (status 3) with nothing more read. DIR (and its subdirectories the names need) exist already.
unpack_bundle() { # dir names
    awk -v dir="$1" -v names="^($2)$" '
        /^#--- / {
            if (NF != 3 || $3 != "---" || $2 !~ names) { bad = 1; exit }
            out = dir "/" $2; next
        }
        out == "" { bad = 1; exit }
        { print > out }
        END { exit bad ? 3 : 0 }'
}

# install_release_tool DIR BIN_DIR: the release tool's files in DIR (provision.sh unpacks them from
# its stdin; test hosts write them) installed as $LIB/<digest of the files>/ ($LIB =
# BIN_DIR/../lib/cognivern-release) (made aside, then renamed into place); $LIB/current is
# pointed at it, and $BIN_DIR/cognivern-release at its launcher, each in one rename: a reader sees
# the old tool or the new one, never a mix, and a running activation keeps its version (the
# launcher resolves `current` once). The version before stays; older ones go.
install_release_tool() { # dir bin_dir: dir holds cognivern-release and cognivern_release/
    local bin_dir=$2 lib digest stage link="../lib/cognivern-release/current/cognivern-release" old before
    lib="$(dirname "$bin_dir")/lib/cognivern-release"
    digest=$(cd "$1" && find cognivern-release cognivern_release -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
    if [ "$(readlink "$lib/current" 2>/dev/null)" = "$digest" ] && [ -d "$lib/$digest" ] &&
        [ "$(readlink "$bin_dir/cognivern-release" 2>/dev/null)" = "$link" ]; then
        say "release tool: ok (already $digest)"
        return
    fi
    install -d -m 0755 "$bin_dir" "$lib"
    if [ ! -d "$lib/$digest" ]; then
        [ "$(head -c 2 "$1/cognivern-release")" = '#!' ] || die "the release tool on stdin has no launcher (cognivern-release, starting with #!)"
        stage=$(mktemp -d "$lib/.stage.XXXXXX")
        cp -R -- "$1/cognivern-release" "$1/cognivern_release" "$stage/"
        chown -R root:root "$stage" # made here, in root's $lib: nobody else can reach it
        find "$stage" -type d -exec chmod 0755 {} + -o -type f -exec chmod 0644 {} +
        chmod 0755 "$stage/cognivern-release"
        mv -T "$stage" "$lib/$digest"
    fi
    before=$(readlink "$lib/current" 2>/dev/null || true)
    ln -sfn "$digest" "$lib/.current.new" && mv -T "$lib/.current.new" "$lib/current"
    ln -sfn "$link" "$bin_dir/.cognivern-release.new" && mv -T "$bin_dir/.cognivern-release.new" "$bin_dir/cognivern-release"
    rm -f -- "$bin_dir/cognivern-pm2.cjs" # the Node helper of the bash tool: its work is in the package now
    # the version that was current stays (an activation under way may still import from it), whatever
    # its age: a switch back to an older digest keeps the one it leaves, not the newest directory
    find "$lib" -mindepth 1 -maxdepth 1 -type d ! -name "$digest" ! -name "${before:-.}" ! -name '.stage.*' -printf '%f\n' |
        while read -r old; do rm -rf -- "${lib:?}/$old"; done
    say "release tool: installed $digest ($bin_dir/cognivern-release)"
}
