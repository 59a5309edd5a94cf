#!/usr/bin/env bash
# Managed by cognivern-infra. Single-server TLS: a Let's Encrypt certificate through certbot's
# webroot plugin, then the HTTPS site (run as root):
#
#   bash -c "$(cat lib.sh tls.sh)" tls --name NAME --domain DOMAIN --email EMAIL --server ACME_DIRECTORY_URL \
#       < rendered-https-site.conf
#
# NAME is the nginx site name nginx-site.sh installed (sites-available/NAME.conf); that HTTP site
# must be the TLS-mode rendering (it answers /.well-known/acme-challenge/ from the webroot below).
# stdin: the rendered HTTPS server block; it must use LETSENCRYPT_DIR/live/DOMAIN/{fullchain,privkey}.pem.
#
# Steps, one line each ("ok (already)" or what changed), so a re-run with a valid certificate
# changes nothing, contacts no ACME server and does not reload nginx:
#   1. certbot present (apt-get install certbot otherwise); the webroot exists.
#   2. deploy hook LETSENCRYPT_DIR/renewal-hooks/deploy/cognivern-nginx-reload: after any renewal,
#      `nginx -t`, then reload nginx (systemctl when systemd runs, else nginx -s reload).
#   3. account: a changed EMAIL is applied to certbot's existing account for SERVER (update_account).
#   4. certificate: kept while it covers DOMAIN, comes from SERVER through this webroot and is valid
#      for 30 more days; else `certbot certonly --webroot` (-n, --agree-tos, --email, --server,
#      --cert-name DOMAIN, --keep-until-expiring; --force-renewal --break-my-certs when SERVER or the
#      webroot changed: the operator asked for another CA). certbot never edits nginx.
#      A certbot failure stops here: nginx and its sites are untouched.
#   5. renewal schedule: certbot.timer (enabled if systemd runs), else the package's /etc/cron.d/certbot
#      (reported; a warning when cron is missing: the certificate would then not renew by itself).
#   6. HTTPS site sites-available/NAME.tls.conf (+ sites-enabled link) and the redirect snippet
#      snippets/NAME.https-redirect.conf beside nginx.conf (`return 301 https://$host$request_uri;`,
#      included by the HTTP site), installed together; `nginx -t`; on failure all three are restored
#      and nginx is not reloaded; else nginx reloads (started if not running). Unchanged: no reload,
#      unless the certificate was just renewed.
#
# Overrides (test hosts), production defaults in brackets: COGNIVERN_NGINX_CONF (/etc/nginx/nginx.conf),
# COGNIVERN_NGINX_PREFIX (nginx -p, optional), COGNIVERN_NGINX_SITES_AVAILABLE (/etc/nginx/sites-available),
# COGNIVERN_NGINX_SITES_ENABLED (/etc/nginx/sites-enabled), COGNIVERN_LETSENCRYPT_DIR (/etc/letsencrypt:
# certbot --config-dir), COGNIVERN_LETSENCRYPT_WORK_DIR (/var/lib/letsencrypt: --work-dir),
# COGNIVERN_LETSENCRYPT_LOGS_DIR (/var/log/letsencrypt: --logs-dir), COGNIVERN_ACME_WEBROOT
# (/var/www/letsencrypt). certbot honours REQUESTS_CA_BUNDLE (a test ACME server's CA).
# Sent after lib.sh (say/warn/die/usage, parse_options, the validators, apt_install, nginx_reload).
set -euo pipefail
umask 022

script_init tls "usage: tls --name NAME --domain DOMAIN --email EMAIL --server ACME_DIRECTORY_URL  (HTTPS site on stdin)"

# ---------------------------------------------------------------------------- arguments
name="" domain="" email="" server=""
parse_options "--name --domain --email --server" "$@"
require_options name domain email server
valid_site_name "$name" || die "--name must be 1-64 characters from A-Z a-z 0-9 _ -, starting with a letter or digit, got '$name'"
label='[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
[[ ${#domain} -le 253 && $domain =~ ^($label\.)+$label$ ]] ||
    die "--domain must be a lowercase DNS name with at least one dot (no wildcard, no trailing dot), got '$domain'"
[[ ${#email} -le 254 && $email =~ ^[A-Za-z0-9._%+-]+@$label(\.$label)+$ ]] || die "--email must be an address such as ops@example.com, got '$email'"
[[ $server =~ ^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/%+-]*)?$ ]] || die "--server must be an https:// ACME directory URL, got '$server'"

conf=${COGNIVERN_NGINX_CONF:-/etc/nginx/nginx.conf}
prefix=${COGNIVERN_NGINX_PREFIX:-}
available=${COGNIVERN_NGINX_SITES_AVAILABLE:-/etc/nginx/sites-available}
enabled=${COGNIVERN_NGINX_SITES_ENABLED:-/etc/nginx/sites-enabled}
le_dir=${COGNIVERN_LETSENCRYPT_DIR:-/etc/letsencrypt}
le_work=${COGNIVERN_LETSENCRYPT_WORK_DIR:-/var/lib/letsencrypt}
le_logs=${COGNIVERN_LETSENCRYPT_LOGS_DIR:-/var/log/letsencrypt}
webroot=${COGNIVERN_ACME_WEBROOT:-/var/www/letsencrypt}
require_abs_paths conf available enabled le_dir le_work le_logs webroot
[ -z "$prefix" ] || valid_abs_path "$prefix" || die "COGNIVERN_NGINX_PREFIX must be an absolute, normalised path"
[ "$(id -u)" -eq 0 ] || die "must run as root (the program prefixes sudo -n for a non-root SSH user)"
[ -f "$conf" ] || die "$conf does not exist"
command -v nginx >/dev/null 2>&1 || die "nginx is not installed"
nginx_args_for "$conf" "$prefix"

live="$le_dir/live/$domain"
renewal_conf="$le_dir/renewal/$domain.conf"
http_site="$available/$name.conf"
site="$available/$name.tls.conf"
link="$enabled/$name.tls.conf"
snippets="$(dirname "$conf")/snippets"
snippet="$snippets/$name.https-redirect.conf"
hook="$le_dir/renewal-hooks/deploy/cognivern-nginx-reload"

# Read the HTTPS site now, before anything else could touch stdin.
tmpdir=$(mktemp -d)
new_site="" new_snippet=""
cleanup() {
    rm -rf -- "$tmpdir"
    [ -z "$new_site" ] || rm -f -- "$new_site"
    [ -z "$new_snippet" ] || rm -f -- "$new_snippet"
}
trap cleanup EXIT
cat >"$tmpdir/site.conf"
[ -s "$tmpdir/site.conf" ] || die "no HTTPS site configuration on stdin"
for file in fullchain privkey; do
    grep -qF " $live/$file.pem;" "$tmpdir/site.conf" ||
        die "the HTTPS site on stdin does not use $live/$file.pem (rendered for another LETSENCRYPT_DIR or domain?)"
done
# The HTTP site must answer the challenge, or certbot would fail after a long wait.
[ -f "$http_site" ] || die "$http_site does not exist: install the HTTP site (nginx-site --name $name) first"
grep -q '/\.well-known/acme-challenge/' "$http_site" ||
    die "$http_site has no ACME challenge location: render the HTTP site with the domain (TLS mode) first"

# ---------------------------------------------------------------------------- certbot + webroot
if command -v certbot >/dev/null 2>&1; then
    say "certbot: ok (already $(certbot --version 2>&1 | tr -d '\n'))"
else
    command -v apt-get >/dev/null 2>&1 || die "certbot is not installed and apt-get is not available"
    apt_install certbot
    hash -r
    say "certbot: installed $(certbot --version 2>&1 | tr -d '\n')"
fi
if [ -d "$webroot" ]; then
    say "webroot: ok (already $webroot)"
else
    install -d -m 0755 "$webroot"
    say "webroot: created $webroot"
fi

# ---------------------------------------------------------------------------- deploy hook
nginx_cmd="nginx -c '$conf'"
[ -z "$prefix" ] || nginx_cmd+=" -p '$prefix'"
cat >"$tmpdir/hook" <<EOF
#!/bin/sh
# Managed by cognivern-infra (tls.sh). certbot runs every executable in renewal-hooks/deploy/ after a
# renewal it made (certbot renew: certbot.timer or /etc/cron.d/certbot). Reload nginx so it serves the
# new certificate, but only when its configuration tests clean; otherwise fail loudly and keep serving.
set -eu
if ! out=\$($nginx_cmd -t 2>&1); then
    printf '%s\n' "\$out" >&2
    echo "cognivern-nginx-reload: nginx -t failed; nginx not reloaded (it keeps the previous certificate)" >&2
    exit 1
fi
if [ -d /run/systemd/system ]; then
    systemctl reload nginx
else
    $nginx_cmd -s reload
fi
echo "cognivern-nginx-reload: nginx reloaded for \${RENEWED_LINEAGE:-a renewed certificate}"
EOF
if [ -f "$hook" ] && [ ! -L "$hook" ] && cmp -s "$tmpdir/hook" "$hook" && [ "$(stat -c '%a %U' "$hook")" = "755 root" ]; then
    say "deploy hook: ok (already $hook)"
else
    install -d -m 0755 "$(dirname "$hook")"
    install -m 0755 -o root -g root "$tmpdir/hook" "$hook.new"
    mv -f "$hook.new" "$hook"
    say "deploy hook: installed $hook"
fi

# ---------------------------------------------------------------------------- ACME account
# certbot keeps one account per ACME server but no copy of its email (regr.json has no contact), so
# the email last given to each server is recorded here; a changed --email is applied with
# update_account, an unchanged one needs no network.
account_dir="$le_dir/accounts/${server#https://}"
account_state="$le_dir/cognivern-acme-accounts"
recorded_email() { awk -v s="$server" '$1 == s { print $2 }' "$account_state" 2>/dev/null || true; }
record_email() {
    { awk -v s="$server" '$1 != s' "$account_state" 2>/dev/null || true; printf '%s %s\n' "$server" "$email"; } >"$tmpdir/accounts"
    install -m 0600 "$tmpdir/accounts" "$account_state"
}
if [ ! -d "$account_dir" ]; then
    say "account: none yet for $server (certbot registers $email with the certificate request)"
elif [ "$(recorded_email)" = "$email" ]; then
    say "account: ok (already $email)"
else
    if ! certbot update_account -n --email "$email" --no-eff-email --server "$server" \
        --config-dir "$le_dir" --work-dir "$le_work" --logs-dir "$le_logs" >"$tmpdir/certbot.log" 2>&1; then
        cat "$tmpdir/certbot.log" >&2
        die "account: certbot could not change the account email to $email at $server; nginx and its sites are untouched"
    fi
    record_email
    say "account: email set to $email"
fi

# ---------------------------------------------------------------------------- certificate
fingerprint() {
    [ -f "$live/fullchain.pem" ] || return 0
    openssl x509 -in "$live/fullchain.pem" -noout -fingerprint -sha256 2>/dev/null || true
}
renewal_value() { sed -n "s/^$1 = //p" "$renewal_conf" 2>/dev/null | head -n 1; }
# Why certbot must run (empty: the certificate is fine as it is); force=1 when a valid one must be replaced.
reason="" force=0
if [ ! -f "$live/fullchain.pem" ] || [ ! -f "$live/privkey.pem" ] || [ ! -f "$renewal_conf" ]; then
    reason="no certificate for $domain yet"
elif [ "$(renewal_value server)" != "$server" ]; then
    reason="issued by $(renewal_value server), not $server"
    force=1
elif [ "$(renewal_value authenticator)" != webroot ] || ! grep -qxF "$domain = $webroot" "$renewal_conf" ||
    { [ -n "$(renewal_value installer)" ] && [ "$(renewal_value installer)" != None ]; }; then
    reason="renewal is not set up as webroot $webroot without installer"
    force=1
elif ! openssl x509 -in "$live/fullchain.pem" -noout -checkhost "$domain" 2>/dev/null | grep -q 'does match'; then
    reason="the certificate does not cover $domain"
    force=1
elif ! openssl x509 -in "$live/fullchain.pem" -noout -checkend 2592000 >/dev/null 2>&1; then
    reason="the certificate expires within 30 days"
fi
before=$(fingerprint)
if [ -z "$reason" ]; then
    say "certificate: ok (already; $live valid until $(openssl x509 -in "$live/fullchain.pem" -noout -enddate | cut -d= -f2))"
else
    certbot_args=(certonly --webroot -w "$webroot" -d "$domain" --cert-name "$domain" -n --agree-tos --email "$email"
        --no-eff-email --server "$server" --config-dir "$le_dir" --work-dir "$le_work" --logs-dir "$le_logs")
    if [ "$force" -eq 1 ]; then
        # The operator changed the ACME server or the setup: replace the certificate even if valid
        # (--break-my-certs: certbot otherwise refuses a staging certificate over a trusted one).
        certbot_args+=(--force-renewal --break-my-certs)
    else
        certbot_args+=(--keep-until-expiring)
    fi
    if ! certbot "${certbot_args[@]}" >"$tmpdir/certbot.log" 2>&1; then
        cat "$tmpdir/certbot.log" >&2
        die "certificate: certbot could not obtain a certificate for $domain from $server ($reason); nginx and its sites are untouched (log: $le_logs/letsencrypt.log)"
    fi
    if [ ! -f "$live/fullchain.pem" ] || [ ! -f "$live/privkey.pem" ]; then
        die "certbot succeeded but $live has no fullchain.pem/privkey.pem"
    fi
    # A first request registered the account with --email.
    if [ -z "$(recorded_email)" ]; then record_email; fi
    say "certificate: obtained for $domain from $server ($reason); valid until $(openssl x509 -in "$live/fullchain.pem" -noout -enddate | cut -d= -f2)"
fi
cert_changed=0
[ "$(fingerprint)" = "$before" ] || cert_changed=1

# ---------------------------------------------------------------------------- renewal schedule
if [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet certbot.timer; then
        say "renewal: ok (already certbot.timer)"
    elif systemctl enable --now certbot.timer >/dev/null 2>&1; then
        say "renewal: enabled certbot.timer"
    else
        warn "renewal: could not enable certbot.timer; the certificate will not renew by itself"
    fi
elif [ -f /etc/cron.d/certbot ]; then
    if command -v cron >/dev/null 2>&1 || command -v crond >/dev/null 2>&1; then
        say "renewal: ok (/etc/cron.d/certbot, systemd is not running)"
    else
        say "renewal: /etc/cron.d/certbot present but cron is not installed"
        warn "no cron and no systemd on this host: run 'certbot renew' yourself (the deploy hook reloads nginx)"
    fi
else
    warn "renewal: neither certbot.timer (systemd) nor /etc/cron.d/certbot: run 'certbot renew' yourself"
fi

# ---------------------------------------------------------------------------- HTTPS site
cat >"$tmpdir/snippet.conf" <<EOF
# Managed by cognivern-infra (tls.sh): HTTP redirects to HTTPS (included by $http_site).
return 301 https://\$host\$request_uri;
EOF
link_ok=0
if [ -L "$link" ] && [ "$(readlink "$link")" = "$site" ]; then link_ok=1; fi
if [ "$link_ok" -eq 1 ] && [ -f "$site" ] && cmp -s "$tmpdir/site.conf" "$site" && [ -f "$snippet" ] && cmp -s "$tmpdir/snippet.conf" "$snippet"; then
    if [ "$cert_changed" -eq 0 ]; then
        say "https site: $site unchanged (nginx not reloaded)"
        exit 0
    fi
    if ! output=$(run_nginx -t 2>&1); then
        printf '%s\n' "$output" >&2
        die "nginx -t failed; nginx not reloaded, so it still serves the previous certificate"
    fi
    action="unchanged, certificate renewed"
else
    if [ -e "$link" ] && [ ! -L "$link" ]; then die "$link exists and is not a symlink; refusing to replace it"; fi
    install -d -m 0755 "$available" "$enabled" "$snippets"
    # Keep what is there now, to restore it if nginx -t rejects the new configuration.
    for file in "$site" "$snippet"; do
        if [ -f "$file" ]; then cp -p "$file" "$tmpdir/$(basename "$file").prev"; fi
    done
    old_link=""
    if [ -L "$link" ]; then old_link=$(readlink "$link"); fi
    new_site=$(mktemp "$available/.$name.tls.conf.new.XXXXXX")
    new_snippet=$(mktemp "$snippets/.$name.https-redirect.conf.new.XXXXXX")
    cp "$tmpdir/site.conf" "$new_site"
    cp "$tmpdir/snippet.conf" "$new_snippet"
    chmod 0644 "$new_site" "$new_snippet"
    mv -f "$new_site" "$site"
    mv -f "$new_snippet" "$snippet"
    ln -sfn "$site" "$link"
    if ! output=$(run_nginx -t 2>&1); then
        for file in "$site" "$snippet"; do
            if [ -f "$tmpdir/$(basename "$file").prev" ]; then
                mv -f "$tmpdir/$(basename "$file").prev" "$file"
            else
                rm -f -- "$file"
            fi
        done
        if [ -n "$old_link" ]; then ln -sfn "$old_link" "$link"; else rm -f -- "$link"; fi
        printf '%s\n' "$output" >&2
        die "nginx -t rejected the HTTPS site $name; previous configuration restored, nginx not reloaded (the certificate stays in $live)"
    fi
    action="installed"
fi

nginx_reload start
say "https site: $site $action, HTTP redirects to https://$domain, ${nginx_action:?}"
