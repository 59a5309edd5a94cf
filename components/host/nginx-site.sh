#!/usr/bin/env bash
# Managed by cognivern-infra. Installs the rendered nginx site from stdin (run as root):
#
#   bash -c "$(cat lib.sh nginx-site.sh)" nginx-site --name NAME < rendered-site.conf [+ upstream]
#
# The site includes sites-available/NAME.upstream (the live blue/green slot, rewritten by
# cognivern-release at every switch). After the site, stdin may carry a line
# "#--- NAME.upstream ---" and that file's text as the program renders it (the blue slot live):
# it is written only when the file is missing, so running this again never flips the live slot.
#
# Writes sites-available/NAME.conf through a temp file, links sites-enabled/NAME.conf and runs
# `nginx -t`. A failing test restores the previous site (or removes the new one) and exits
# non-zero with nginx's message; the running nginx is not touched. An unchanged site does nothing.
# Otherwise nginx is reloaded (started if it is not running).
#
# Overrides (test hosts): COGNIVERN_NGINX_CONF (/etc/nginx/nginx.conf), COGNIVERN_NGINX_PREFIX
# (nginx -p, optional), COGNIVERN_NGINX_SITES_AVAILABLE (/etc/nginx/sites-available),
# COGNIVERN_NGINX_SITES_ENABLED (/etc/nginx/sites-enabled).
# Sent after lib.sh (say/die/usage, parse_options, the validators, nginx_reload).
set -euo pipefail
umask 022

script_init nginx-site "usage: nginx-site --name NAME  (rendered site on stdin, then optionally the upstream file)"
name=""
parse_options "--name" "$@"
require_options name
valid_site_name "$name" || die "--name must be 1-64 characters from A-Z a-z 0-9 _ -, starting with a letter or digit, got '$name'"

conf=${COGNIVERN_NGINX_CONF:-/etc/nginx/nginx.conf}
prefix=${COGNIVERN_NGINX_PREFIX:-}
available=${COGNIVERN_NGINX_SITES_AVAILABLE:-/etc/nginx/sites-available}
enabled=${COGNIVERN_NGINX_SITES_ENABLED:-/etc/nginx/sites-enabled}
require_abs_paths conf available enabled
[ -z "$prefix" ] || valid_abs_path "$prefix" || die "COGNIVERN_NGINX_PREFIX must be an absolute, normalised path"
[ -f "$conf" ] || die "$conf does not exist"
command -v nginx >/dev/null 2>&1 || die "nginx is not installed"
nginx_args_for "$conf" "$prefix"

site="$available/$name.conf"
link="$enabled/$name.conf"
install -d -m 0755 "$available" "$enabled"

# Temp files live in sites-available (never included by nginx) with a leading dot.
new=$(mktemp "$available/.$name.conf.new.XXXXXX")
upstream_new=$(mktemp "$available/.$name.upstream.new.XXXXXX")
previous=""
cleanup() {
    rm -f -- "$new" "$upstream_new"
    [ -z "$previous" ] || rm -f -- "$previous"
}
trap cleanup EXIT
awk -v site="$new" -v up="$upstream_new" -v marker="#--- $name.upstream ---" \
    '$0 == marker { u = 1; next } { print > (u ? up : site) }'
[ -s "$new" ] || die "no site configuration on stdin"
chmod 0644 "$new" "$upstream_new"

# The upstream file: written when missing only (afterwards it is cognivern-release's).
upstream_file="$available/$name.upstream"
created_upstream=""
if [ -s "$upstream_new" ] && [ ! -e "$upstream_file" ]; then
    mv -f "$upstream_new" "$upstream_file"
    created_upstream=$upstream_file
    say "$upstream_file: created"
fi

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

if ! output=$(run_nginx -t 2>&1); then
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

nginx_reload start
say "$site: installed, ${nginx_action:?}"
