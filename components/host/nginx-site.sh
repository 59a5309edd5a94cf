#!/usr/bin/env bash
# Managed by cognivern-infra. Installs the rendered nginx site from stdin (run as root):
#
#   bash -c "$(cat nginx-site.sh)" nginx-site --name NAME [--upstream-port PORT] < rendered-site.conf
#
# The site includes sites-available/NAME.upstream (the live blue/green slot, rewritten by
# cognivern-release at every switch). --upstream-port creates it, pointing at PORT (the blue slot),
# only when it is missing: running this again (a `pulumi up`) never flips the live slot.
#
# Writes sites-available/NAME.conf through a temp file, links sites-enabled/NAME.conf and runs
# `nginx -t`. A failing test restores the previous site (or removes the new one) and exits
# non-zero with nginx's message; the running nginx is not touched. An unchanged site does nothing.
# Otherwise nginx is reloaded (started if it is not running).
#
# Overrides (test hosts): COGNIVERN_NGINX_CONF (/etc/nginx/nginx.conf), COGNIVERN_NGINX_PREFIX
# (nginx -p, optional), COGNIVERN_NGINX_SITES_AVAILABLE (/etc/nginx/sites-available),
# COGNIVERN_NGINX_SITES_ENABLED (/etc/nginx/sites-enabled).
set -euo pipefail
umask 022

prog=nginx-site
say() { printf '%s: %s\n' "$prog" "$*"; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
usage() {
    echo "usage: nginx-site --name NAME [--upstream-port PORT]  (rendered site on stdin)" >&2
    exit 2
}

name=""
upstream_port=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --name)
            [ "$#" -ge 2 ] || { echo "$prog: --name needs a value" >&2; usage; }
            name=$2
            shift 2
            ;;
        --upstream-port)
            [ "$#" -ge 2 ] || { echo "$prog: --upstream-port needs a value" >&2; usage; }
            upstream_port=$2
            shift 2
            ;;
        -h | --help) usage ;;
        *) echo "$prog: unknown argument: $1" >&2; usage ;;
    esac
done
[ -n "$name" ] || { echo "$prog: --name is required" >&2; usage; }
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || die "--name must be 1-64 characters from A-Z a-z 0-9 . _ -, got '$name'"
if [ -n "$upstream_port" ]; then
    if ! [[ $upstream_port =~ ^[1-9][0-9]{0,4}$ ]] || [ "$upstream_port" -gt 65535 ]; then
        die "--upstream-port must be a port number, got '$upstream_port'"
    fi
fi

valid_abs_path() {
    [[ $1 =~ ^(/[A-Za-z0-9._-]+)+$ ]] || return 1
    [[ /$1/ != */./* && /$1/ != */../* ]]
}
conf=${COGNIVERN_NGINX_CONF:-/etc/nginx/nginx.conf}
prefix=${COGNIVERN_NGINX_PREFIX:-}
available=${COGNIVERN_NGINX_SITES_AVAILABLE:-/etc/nginx/sites-available}
enabled=${COGNIVERN_NGINX_SITES_ENABLED:-/etc/nginx/sites-enabled}
for var in conf available enabled; do
    valid_abs_path "${!var}" || die "$var must be an absolute, normalised path, got '${!var}'"
done
[ -z "$prefix" ] || valid_abs_path "$prefix" || die "COGNIVERN_NGINX_PREFIX must be an absolute, normalised path"
[ -f "$conf" ] || die "$conf does not exist"
command -v nginx >/dev/null 2>&1 || die "nginx is not installed"
nginx_args=(-c "$conf")
[ -z "$prefix" ] || nginx_args+=(-p "$prefix")

site="$available/$name.conf"
link="$enabled/$name.conf"
install -d -m 0755 "$available" "$enabled"

# The upstream file: written when missing only (afterwards it is cognivern-release's). Same text as
# the tool's write_upstream with no backup (tests/test_host_scripts.py compares them).
upstream_file="$available/$name.upstream"
created_upstream=""
if [ -n "$upstream_port" ] && [ ! -e "$upstream_file" ]; then
    printf '# Managed by cognivern-release: the live slot, and the other slot as backup while it runs.\nupstream %s_app {\n    server 127.0.0.1:%s;\n    keepalive 32;\n}\n' \
        "${name//[^A-Za-z0-9_]/_}" "$upstream_port" >"$upstream_file.tmp"
    chmod 0644 "$upstream_file.tmp"
    mv -f "$upstream_file.tmp" "$upstream_file"
    created_upstream=$upstream_file
    say "$upstream_file: created (live slot 127.0.0.1:$upstream_port)"
fi

# Temp files live in sites-available (never included by nginx) with a leading dot.
new=$(mktemp "$available/.$name.conf.new.XXXXXX")
previous=""
cleanup() {
    rm -f -- "$new"
    [ -z "$previous" ] || rm -f -- "$previous"
}
trap cleanup EXIT
cat >"$new"
[ -s "$new" ] || die "no site configuration on stdin"
chmod 0644 "$new"

link_ok=0
if [ -L "$link" ] && [ "$(readlink "$link")" = "$site" ]; then link_ok=1; fi
if [ "$link_ok" -eq 1 ] && [ -f "$site" ] && cmp -s "$new" "$site"; then
    say "$site: unchanged (nginx not reloaded)"
    exit 0
fi
if [ -e "$link" ] && [ ! -L "$link" ]; then
    die "$link exists and is not a symlink; refusing to replace it"
fi

if [ -f "$site" ]; then
    previous=$(mktemp "$available/.$name.conf.prev.XXXXXX")
    cp -p "$site" "$previous"
fi
old_link=""
if [ -L "$link" ]; then old_link=$(readlink "$link"); fi

mv -f "$new" "$site"
ln -sfn "$site" "$link"

if ! output=$(nginx -t "${nginx_args[@]}" 2>&1); then
    if [ -n "$previous" ]; then
        mv -f "$previous" "$site"
        previous=""
    else
        rm -f -- "$site"
    fi
    if [ -n "$old_link" ]; then ln -sfn "$old_link" "$link"; else rm -f -- "$link"; fi
    [ -z "$created_upstream" ] || rm -f -- "$created_upstream"
    printf '%s\n' "$output" >&2
    die "nginx -t rejected the new $name site; previous configuration restored, nginx not reloaded"
fi

if [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet nginx; then
        systemctl reload nginx
        action="reloaded nginx"
    else
        systemctl start nginx
        action="started nginx"
    fi
elif nginx "${nginx_args[@]}" -s reload >/dev/null 2>&1; then
    action="reloaded nginx"
else
    # No running master (no pid file or a stale one): start it.
    if ! output=$(nginx "${nginx_args[@]}" 2>&1); then
        printf '%s\n' "$output" >&2
        die "nginx is not running and could not be started"
    fi
    action="started nginx"
fi
say "$site: installed, $action"
