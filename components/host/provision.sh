#!/usr/bin/env bash
# Managed by cognivern-infra. Idempotent host preparation for the Cognivern backend (run as root).
#
#   bash -c "$(cat lib.sh provision.sh)" provision --root R --app-user U --build-user B --ssh-user S \
#       --node-major N --node-source nodesource|distribution --pm2-version X.Y.Z --pnpm-version X.Y.Z \
#       --metadata-filter yes|no < bundle
#
# stdin (components.host.host_bundle): files as text, each after a line "#--- PATH ---":
# cognivern-metadata-filter and cognivern-metadata-filter.service (installed with --metadata-filter
# yes: servers the program creates, where Hetzner's metadata service exists; PM2's unit then requires
# that unit). Every step prints one line, "ok (already)" or what it changed, so a re-run on a
# prepared host changes nothing and says so. The program installs the release tool with a command of
# its own (components/tool/install-tool.sh), so an edit of the tool never re-runs provisioning; test
# hosts that prepare a host in one command may put the tool's files in front on stdin
# (components.host.release_tool_bundle: the launcher cognivern-release and cognivern_release/*.py),
# which this then installs the same way (lib.sh's install_release_tool).
# Supported: Ubuntu 24.04, Debian 12 and 13. Nothing under R/shared is ever deleted.
#
# The app user is treated as hostile: the directories root works in (R, releases/, shared/,
# cache/, backups/) belong to root; only the leaves the app writes (shared/data, shared/logs,
# cache/pnpm-store) and its home (0700, with ~/.pm2 0700: PM2's dump holds the app's env) are its.
# An existing account is taken as the app user only when it has the shape this script gives one
# (home /home/U, own group, no other groups, no password): never a system or a login account.
# The build account B runs `pnpm install` for the release tool: neither root nor the app, its own
# store, HOME and npmrc under R/cache/build, so the app can write nothing a build reads or writes.
#
# Overrides (test hosts): COGNIVERN_BIN_DIR (/usr/local/bin), COGNIVERN_LOGROTATE_DIR
# (/etc/logrotate.d), COGNIVERN_SSHD_CONFIG (/etc/ssh/sshd_config; the drop-in goes into its
# sibling sshd_config.d/), COGNIVERN_SSHD_PIDFILE (reload by SIGHUP when systemd is not running),
# COGNIVERN_NGINX_SITES_ENABLED (/etc/nginx/sites-enabled), COGNIVERN_NGINX_CONF and
# COGNIVERN_NGINX_PREFIX (nginx -c / -p for the reload after removing the distro default site),
# COGNIVERN_SYSTEMD_DIR (/etc/systemd/system; unit files are written only when systemd runs, or
# into this directory when it is set).
# Sent after lib.sh (say/die/usage, parse_options, the validators, apt, nginx_reload).
set -euo pipefail
umask 022

script_init provision "usage: provision --root ABS_PATH --app-user USER --build-user USER --ssh-user USER --node-major N
                 --node-source nodesource|distribution --pm2-version X.Y.Z --pnpm-version X.Y.Z
                 --metadata-filter yes|no  (release tool bundle on stdin)"

# ---------------------------------------------------------------------------- arguments
root="" app_user="" build_user="" node_major="" node_source="" ssh_user="" pm2_version="" pnpm_version="" metadata_filter=""
parse_options "--root --app-user --build-user --node-major --node-source --ssh-user --pm2-version --pnpm-version --metadata-filter" "$@"
require_options root app_user build_user node_major node_source ssh_user pm2_version pnpm_version metadata_filter
valid_abs_path "$root" || die "--root must be an absolute, normalised path such as /opt/cognivern, got '$root'"
! system_path "$root" || die "--root $root is a system directory (or inside one); use a directory of its own such as /opt/cognivern"
# ROOT's parents must be root's alone: under a directory another user can write (a sticky /tmp
# included, and any other such directory settings.SHARED_TEMP_DIRS does not name) that user could
# create ROOT first or swap it, and temp cleanup could delete releases and data. Parents that do not
# exist yet are created by root below, 0755.
root_parent=$(dirname "$root")
while [ ! -e "$root_parent" ] && [ ! -L "$root_parent" ]; do root_parent=$(dirname "$root_parent"); done
bad_parent=$(untrusted_dir "$root_parent")
[ -z "$bad_parent" ] ||
    die "--root $root is under $bad_parent ($(describe_dir "$bad_parent")), which is not root's alone: another user could create or swap it; use a directory of its own such as /opt/cognivern"
valid_user "$app_user" || die "--app-user must be a Linux user name (a-z 0-9 _ -), got '$app_user'"
[ "$app_user" != root ] || die "--app-user must not be root"
valid_user "$ssh_user" || die "--ssh-user must be a Linux user name (a-z 0-9 _ -), got '$ssh_user'"
[ "$app_user" != "$ssh_user" ] || die "--app-user must differ from --ssh-user ($ssh_user): the deploy login has sudo, the app must not"
valid_user "$build_user" || die "--build-user must be a Linux user name (a-z 0-9 _ -), got '$build_user'"
case $build_user in root | "$app_user" | "$ssh_user") die "--build-user must be an account of its own, not root, the app or the SSH user" ;; esac
[[ $node_major =~ ^[1-9][0-9]{0,2}$ ]] || die "--node-major must be a number such as 22, got '$node_major'"
case "$node_source" in nodesource | distribution) ;; *) die "--node-source must be nodesource or distribution, got '$node_source'" ;; esac
[[ $pm2_version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--pm2-version must be X.Y.Z, got '$pm2_version'"
[[ $pnpm_version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--pnpm-version must be X.Y.Z, got '$pnpm_version'"
[[ $metadata_filter =~ ^(yes|no)$ ]] || die "--metadata-filter must be yes or no, got '$metadata_filter'"

bin_dir=${COGNIVERN_BIN_DIR:-/usr/local/bin}
logrotate_dir=${COGNIVERN_LOGROTATE_DIR:-/etc/logrotate.d}
sshd_config=${COGNIVERN_SSHD_CONFIG:-/etc/ssh/sshd_config}
sshd_pidfile=${COGNIVERN_SSHD_PIDFILE:-}
sites_enabled=${COGNIVERN_NGINX_SITES_ENABLED:-/etc/nginx/sites-enabled}
nginx_conf=${COGNIVERN_NGINX_CONF:-/etc/nginx/nginx.conf}
nginx_prefix=${COGNIVERN_NGINX_PREFIX:-}
systemd_dir=${COGNIVERN_SYSTEMD_DIR:-/etc/systemd/system}
require_abs_paths bin_dir logrotate_dir sshd_config sites_enabled nginx_conf systemd_dir
[ -z "$sshd_pidfile" ] || valid_abs_path "$sshd_pidfile" || die "COGNIVERN_SSHD_PIDFILE must be an absolute path"
[ -z "$nginx_prefix" ] || valid_abs_path "$nginx_prefix" || die "COGNIVERN_NGINX_PREFIX must be an absolute path"
[ "$(id -u)" -eq 0 ] || die "must run as root (the program prefixes sudo -n for a non-root SSH user)"
id -u "$ssh_user" >/dev/null 2>&1 || die "--ssh-user $ssh_user does not exist on this host"

# Read the release tool now, before anything changes (and before apt could touch stdin).
tmpdir=$(mktemp -d)
trap 'rm -rf -- "$tmpdir"' EXIT
bundle="$tmpdir/bundle"
mkdir -m 0700 "$bundle" "$bundle/cognivern_release"
if [ ! -t 0 ]; then
    unpack_bundle "$bundle" 'cognivern-release|cognivern_release/[a-z0-9_]+\.py|cognivern-metadata-filter|cognivern-metadata-filter\.service' ||
        die "stdin is not a bundle of the files it takes (lines \"#--- PATH ---\" before each)"
fi
filter_src="$bundle/cognivern-metadata-filter"
filter_unit=cognivern-metadata-filter.service

if [ "$metadata_filter" = yes ] && { [ ! -s "$filter_src" ] || [ ! -s "$bundle/$filter_unit" ]; }; then
    die "--metadata-filter yes needs cognivern-metadata-filter and its unit on stdin (components.host.release_tool_bundle)"
fi

systemd_running() { [ -d /run/systemd/system ]; }
# Unit files go where systemd reads them when it runs; a test host sets COGNIVERN_SYSTEMD_DIR to
# have them written (and checked) without systemd.
units_wanted() { systemd_running || [ -n "${COGNIVERN_SYSTEMD_DIR:-}" ]; }
units_changed=0
put_unit_file() { # path mode content: install it when it differs (units_changed=1); says nothing
    [ "$(cat "$1" 2>/dev/null || true)" != "$3" ] || [ "$(stat -c '%U:%G %a' "$1")" != "root:root ${2#0}" ] || return 1
    install -d -m 0755 "$(dirname "$1")"
    printf '%s\n' "$3" >"$tmpdir/unit"
    install -o root -g root -m "$2" "$tmpdir/unit" "$1"
    units_changed=1
}

# ---------------------------------------------------------------------------- cloud-init
if [ -d /run/cloud-init ] && command -v cloud-init >/dev/null 2>&1; then
    rc=0
    timeout 1800 cloud-init status --wait >/dev/null || rc=$?
    case "$rc" in
        0) say "cloud-init: ok (finished)" ;;
        2) say "cloud-init: ok (finished, degraded: see cloud-init status --long)" ;;
        124) die "cloud-init still running after 30 minutes" ;;
        *) die "cloud-init failed (cloud-init status exit $rc); see cloud-init status --long" ;;
    esac
else
    say "cloud-init: ok (did not run on this boot; not waiting)"
fi

# ---------------------------------------------------------------------------- packages
pkg_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)
    [ "$status" = "install ok installed" ]
}
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
# the release tool is Python (standard library: python3, not python3-minimal, which lacks json, tarfile and shlex)
[ -x /usr/bin/python3 ] && pkg_installed "python3" || missing+=(python3)
wanted=(curl ca-certificates logrotate tar gzip util-linux)
[ "$node_source" != nodesource ] || wanted+=(gpg) # only to check NodeSource's key
for pkg in "${wanted[@]}"; do
    pkg_installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
    say "packages: ok (already)"
else
    # What each needs, not what it suggests: gpg alone recommends 12 packages (gnupg, dirmngr, an agent).
    apt_install --no-install-recommends "${missing[@]}"
    say "packages: installed ${missing[*]}"
fi

# ---------------------------------------------------------------------------- metadata filter
# Servers the program creates: Hetzner's metadata service hands the user data (this server's SSH
# host key) to any local process. cloud-init's bootcmd loads the filter at every boot, but in its
# network stage, when PM2 may already be resurrecting the app; this unit loads it before
# network-pre.target, and PM2's unit requires it (pm2 at boot, below). Loaded now, before anything
# of the app's is installed; reloaded (never restarted: PM2 would restart with it) after a change.
if [ "$metadata_filter" = yes ]; then
    if ! command -v nft >/dev/null 2>&1 && ! command -v iptables >/dev/null 2>&1; then
        apt_install nftables
        say "metadata filter: installed nftables (there was no nft or iptables)"
    fi
    filter_changes=()
    filter_dst="$bin_dir/cognivern-metadata-filter"
    if [ -f "$filter_dst" ] && [ "$(stat -c '%U:%G %a' "$filter_dst")" = "root:root 755" ] && cmp -s "$filter_src" "$filter_dst"; then
        :
    else
        install -d -m 0755 "$bin_dir"
        install -o root -g root -m 0755 "$filter_src" "$filter_dst"
        filter_changes+=("installed $filter_dst")
    fi
    if units_wanted; then
        unit_text=$(<"$bundle/$filter_unit")
        if put_unit_file "$systemd_dir/$filter_unit" 0644 "${unit_text//@BIN_DIR@/$bin_dir}"; then
            filter_changes+=("wrote $systemd_dir/$filter_unit")
        fi
    fi
    if ! systemd_running && [ "${#filter_changes[@]}" -eq 0 ]; then
        say "metadata filter: ok (already installed; not loaded: systemd is not running)"
    elif ! systemd_running; then
        joined=$(printf '%s; ' "${filter_changes[@]}")
        say "metadata filter: ${joined%; } (not loaded: systemd is not running)"
    elif [ "${#filter_changes[@]}" -eq 0 ] && systemctl is-enabled --quiet "$filter_unit" && systemctl is-active --quiet "$filter_unit"; then
        say "metadata filter: ok (already $filter_unit)"
    else
        [ "$units_changed" = 0 ] || systemctl daemon-reload
        systemctl enable --quiet "$filter_unit"
        systemctl reload-or-restart "$filter_unit" # active: ExecReload re-runs the script; else it starts
        filter_changes+=("enabled and loaded $filter_unit")
        joined=$(printf '%s; ' "${filter_changes[@]}")
        say "metadata filter: ${joined%; }"
    fi
fi

# ---------------------------------------------------------------------------- Node.js
# NodeSource's repository signing key (NSolid <nsolid-gpg@nodesource.com>), checked by fingerprint.
readonly NODESOURCE_FPR=6F71F525282841EEDAF851B42F59B5F99B1BE0B4
key_fingerprints() { # primary-key fingerprints of an armored key file, one a line
    gpg --batch --show-keys --with-colons "$1" 2>/dev/null | awk -F: '$1 == "pub" { want = 1 } $1 == "fpr" && want { print $10; want = 0 }'
}
nodesource_node() { # NodeSource's node_N.x repository, its key checked by fingerprint
    local keyring=/etc/apt/keyrings/nodesource.asc
    install -d -m 0755 /etc/apt/keyrings
    if [ ! -s "$keyring" ]; then
        curl -fsSL --retry 3 https://deb.nodesource.com/gpgkey/nodesource-repo.gpg.key -o "$tmpdir/nodesource.asc" ||
            die "cannot fetch NodeSource's key from https://deb.nodesource.com (cognivern:nodeSource nodesource); a host that cannot reach NodeSource can use cognivern:nodeSource distribution"
        grep -q 'BEGIN PGP PUBLIC KEY BLOCK' "$tmpdir/nodesource.asc" || die "NodeSource key download is not a PGP key"
        have_fpr=$(key_fingerprints "$tmpdir/nodesource.asc")
        [ "$have_fpr" = "$NODESOURCE_FPR" ] ||
            die "NodeSource key has fingerprint(s) '${have_fpr//$'\n'/ }', expected $NODESOURCE_FPR; not trusted"
        install -m 0644 "$tmpdir/nodesource.asc" "$keyring"
    fi
    cat >/etc/apt/sources.list.d/nodesource.sources <<EOF
Types: deb
URIs: https://deb.nodesource.com/node_${node_major}.x
Suites: nodistro
Components: main
Signed-By: ${keyring}
EOF
    # Prefer NodeSource's nodejs over the distribution's package of the same name.
    cat >/etc/apt/preferences.d/nodesource <<'EOF'
Package: nodejs
Pin: origin deb.nodesource.com
Pin-Priority: 600
EOF
    apt_get update # the new NodeSource source: its lists are not there yet
    apt_get install nodejs
    node_from="NodeSource"
}
nodejs_candidate() { apt-cache policy nodejs 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'; }
distribution_node() { # the distribution's nodejs and npm: one major per release
    local candidate major os removed=""
    # A NodeSource repository from an earlier nodeSource would win over the distribution's package.
    for f in /etc/apt/sources.list.d/nodesource.sources /etc/apt/preferences.d/nodesource; do
        if [ -e "$f" ]; then
            rm -f -- "$f"
            removed=1
        fi
    done
    candidate=$(nodejs_candidate)
    if [ -z "$candidate" ] || [ -n "$removed" ]; then
        apt_get update
        candidate=$(nodejs_candidate)
    fi
    # shellcheck disable=SC1091 # the host's own
    os=$(. /etc/os-release && echo "${PRETTY_NAME:-$ID}")
    [ -n "$candidate" ] || die "$os has no nodejs package (cognivern:nodeSource distribution); set cognivern:nodeSource to nodesource"
    major=${candidate#*:}
    major=${major%%.*}
    [ "$major" = "$node_major" ] ||
        die "cognivern:nodeMajor is $node_major, but $os packages Node $major (nodejs $candidate; cognivern:nodeSource distribution); set cognivern:nodeMajor to $major, or cognivern:nodeSource to nodesource"
    # Debian's npm recommends a compiler toolchain (node-gyp, build-essential): not for a server.
    apt_get install --no-install-recommends --allow-downgrades "nodejs=$candidate" npm
    node_from="the distribution (nodejs $candidate)"
}
node_version=$(node --version 2>/dev/null || true)
if [[ $node_version == "v$node_major."* ]] && command -v npm >/dev/null 2>&1; then
    say "node: ok (already $node_version)"
else
    "${node_source}_node"
    hash -r
    new_version=$(node --version 2>/dev/null || true)
    [[ $new_version == "v$node_major."* ]] || die "node is ${new_version:-missing} after installing Node $node_major from $node_from"
    command -v npm >/dev/null 2>&1 || die "npm is missing after installing Node $node_major from $node_from"
    say "node: installed $new_version from $node_from (was ${node_version:-none})"
fi

# ---------------------------------------------------------------------------- app user
# The app user is a system account with a locked password and no SSH keys, so nobody can log in
# as it. Its shell is bash (not nologin) so operators and tools can use `runuser -l`/`sudo -iu`
# to run pm2 in its environment; our own scripts call `runuser -u U -- env -i HOME=... pm2 ...`,
# which does not need a shell at all.
app_home=/home/$app_user
# An existing account is the app's only if it has exactly the shape useradd gives it below: any
# other (www-data, nobody, a person's login with a password or sudo) would hand the hostile app
# that account's files and rights, and root would chown things to it.
account_problem() { # user home: why it is not an account this script made, or nothing
    local uid home group groups pass
    uid=$(id -u "$1")
    home=$(getent passwd "$1" | cut -d: -f6)
    group=$(id -gn "$1")
    groups=$(id -Gn "$1")
    pass=$(getent shadow "$1" | cut -d: -f2)
    if [ "$uid" -lt 100 ]; then echo "is a base system account (uid $uid)"
    elif [ "$home" != "$2" ]; then echo "has its home at ${home:-nowhere}, not $2 (a service or login account)"
    elif [ "$group" != "$1" ] || [ "$groups" != "$1" ]; then echo "belongs to groups '$groups' (the app's account has only its own)"
    elif [ -n "$pass" ] && [ "${pass:0:1}" != '!' ] && [ "${pass:0:1}" != '*' ]; then echo "has a password (a login account)"
    fi
}
if id -u "$app_user" >/dev/null 2>&1; then
    problem=$(account_problem "$app_user" "$app_home")
    [ -z "$problem" ] || die "--app-user $app_user already exists and $problem; refusing to run the app as it (choose another cognivern:appUser)"
    say "app user: ok (already $app_user)"
else
    useradd --system --create-home --home-dir "$app_home" --shell /bin/bash --user-group "$app_user"
    say "app user: created $app_user (home $app_home)"
fi
app_home=$(getent passwd "$app_user" | cut -d: -f6)
if [ -z "$app_home" ] || [ -L "$app_home" ] || [ ! -d "$app_home" ]; then die "home directory of $app_user is missing"; fi
# PM2's dump (~/.pm2/dump.pm2) holds every .env variable: home and ~/.pm2 are the app's alone.
# /home is root's, so the home itself cannot be swapped for a link; ~/.pm2 can, so the app's own
# chmod (not root's) sets it.
home_changes=()
if [ "$(stat -c '%U %a' "$app_home")" != "$app_user 700" ]; then
    [ "$(stat -c '%U' "$app_home")" = "$app_user" ] || die "$app_home is not owned by $app_user"
    chmod 0700 "$app_home"
    home_changes+=("$app_home 0700")
fi
if [ "$(stat -c '%U %a' "$app_home/.pm2" 2>/dev/null || true)" != "$app_user 700" ]; then
    # shellcheck disable=SC2016 # $1 is the inner shell's
    (cd / && runuser -u "$app_user" -- sh -c 'mkdir -p -m 0700 "$1" && chmod 0700 "$1"' sh "$app_home/.pm2") ||
        die "could not make $app_home/.pm2 private (is it a link?)"
    home_changes+=("$app_home/.pm2 0700")
fi
if [ "${#home_changes[@]}" -eq 0 ]; then
    say "app home: ok (already private)"
else
    say "app home: made private: ${home_changes[*]}"
fi

# ---------------------------------------------------------------------------- build account
# Runs `pnpm install` for the release tool (packages run install scripts): no login, no home of its
# own outside R/cache/build/work, no group but its own. Checked like the app's account.
build_home="$root/cache/build/work"
if id -u "$build_user" >/dev/null 2>&1; then
    problem=$(account_problem "$build_user" "$build_home")
    [ -z "$problem" ] || die "--build-user $build_user already exists and $problem; refusing to build releases as it"
    say "build user: ok (already $build_user)"
else
    useradd --system --no-create-home --home-dir "$build_home" --shell /usr/sbin/nologin --user-group "$build_user"
    say "build user: created $build_user (home $build_home)"
fi

# ---------------------------------------------------------------------------- layout
layout_changes=()
ensure_dir() { # path owner group mode
    local path=$1 owner=$2 group=$3 mode=$4
    [ ! -L "$path" ] || die "$path is a symbolic link where a directory belongs; refusing to work through it (remove it)"
    if [ -e "$path" ] && [ ! -d "$path" ]; then die "$path exists but is not a directory"; fi
    if [ ! -d "$path" ]; then
        install -d -o "$owner" -g "$group" -m "$mode" "$path"
        layout_changes+=("created $path")
        return
    fi
    local have
    have=$(stat -c '%U:%G %a' "$path")
    if [ "$have" != "$owner:$group ${mode#0}" ]; then
        # Not a link (checked above) and its parent is root's, so nobody can swap it meanwhile.
        chown -h "$owner:$group" "$path"
        chmod "$mode" "$path"
        layout_changes+=("fixed $path ($have -> $owner:$group ${mode#0})")
    fi
}
ssh_group=$(id -gn "$ssh_user")
# Root-owned where root works; the app's only the leaves it writes (parents first: once shared/ is
# root's, the app can no longer put a link where shared/data is expected).
ensure_dir "$root" root root 0755
ensure_dir "$root/releases" root root 0755
ensure_dir "$root/shared" root root 0755
ensure_dir "$root/shared/data" "$app_user" "$app_user" 0750
ensure_dir "$root/shared/logs" "$app_user" "$app_user" 0750
ensure_dir "$root/cache" root root 0755
ensure_dir "$root/cache/pnpm-store" "$app_user" "$app_user" 0750
ensure_dir "$root/cache/build" root root 0755
ensure_dir "$root/cache/build/work" "$build_user" "$build_user" 0700
ensure_dir "$root/backups" root root 0700
ensure_dir "$root/config" root root 0755
ensure_dir "$root/.deploy" root root 0700
ensure_dir "$root/incoming" "$ssh_user" "$ssh_group" 0700
# shared/run.sh started the apps before the release tool did (in Python): a stale copy goes.
if [ -e "$root/shared/run.sh" ]; then
    rm -f -- "$root/shared/run.sh"
    layout_changes+=("removed $root/shared/run.sh (the release tool starts the apps)")
fi
if [ "${#layout_changes[@]}" -eq 0 ]; then
    say "layout: ok (already)"
else
    joined=$(printf '%s; ' "${layout_changes[@]}")
    say "layout: ${joined%; }"
fi

# ---------------------------------------------------------------------------- pnpm, pm2
# Pinned versions (components/host/versions.env, the same file CI installs from), from npm: the
# same way on every Node major (corepack, which used to provide pnpm, is gone from Node 25).
npm_global_version() { # version of a globally installed npm package, empty when absent
    local dir
    dir=$(npm root -g 2>/dev/null) || return 0
    [ -f "$dir/$1/package.json" ] || return 0
    node -p 'require(process.argv[1]).version' "$dir/$1/package.json" 2>/dev/null || true
}
npm_global_pin() { # package version
    local have
    have=$(npm_global_version "$1")
    if [ "$have" = "$2" ] && command -v "$1" >/dev/null 2>&1; then
        say "$1: ok (already $2)"
        return
    fi
    # A pnpm shim from corepack (older provisioning) would shadow the npm one.
    if [ "$1" = pnpm ] && command -v corepack >/dev/null 2>&1; then corepack disable pnpm >/dev/null 2>&1 || true; fi
    npm install -g --no-fund --no-audit "$1@$2" >"$tmpdir/npm.log" 2>&1 || { cat "$tmpdir/npm.log" >&2; die "npm install -g $1@$2 failed"; }
    hash -r
    [ "$(npm_global_version "$1")" = "$2" ] || die "$1 is not $2 after npm install -g $1@$2"
    say "$1: installed $2 (was ${have:-none})"
}
npm_global_pin pnpm "$pnpm_version"
npm_global_pin pm2 "$pm2_version"

# ---------------------------------------------------------------------------- pm2 at boot
pm2_unit="pm2-$app_user.service"
if systemd_running; then
    if [ -e "/etc/systemd/system/$pm2_unit" ] && systemctl is-enabled --quiet "$pm2_unit"; then
        say "pm2 startup: ok (already enabled $pm2_unit)"
    else
        env PATH="$PATH" pm2 startup systemd -u "$app_user" --hp "$app_home" >"$tmpdir/pm2.log" 2>&1 ||
            { cat "$tmpdir/pm2.log" >&2; die "pm2 startup systemd failed"; }
        say "pm2 startup: enabled $pm2_unit"
    fi
else
    say "pm2 startup: skipped (systemd is not running on this host)"
fi
if units_wanted; then
    units_changed=0
    # The daemon started at boot must schedule cluster connections like the one the release tool starts.
    dropin="$systemd_dir/$pm2_unit.d/cognivern.conf"
    if put_unit_file "$dropin" 0644 $'[Service]\nEnvironment=NODE_CLUSTER_SCHED_POLICY=none'; then
        say "pm2 startup environment: wrote $dropin"
    else
        say "pm2 startup environment: ok (already)"
    fi
    # The app never starts before the metadata filter (a failed filter keeps PM2 down: fail closed).
    # Only where the filter unit is installed: on a host without it, Requires= would stop PM2 starting.
    if [ "$metadata_filter" = yes ]; then
        dropin="$systemd_dir/$pm2_unit.d/cognivern-metadata-filter.conf"
        if put_unit_file "$dropin" 0644 $'[Unit]\n'"Requires=$filter_unit"$'\n'"After=$filter_unit"; then
            say "pm2 startup order: wrote $dropin (after $filter_unit)"
        else
            say "pm2 startup order: ok (already after $filter_unit)"
        fi
    fi
    if [ "$units_changed" = 1 ] && systemd_running; then systemctl daemon-reload; fi
fi
# On a host whose app user runs no PM2 daemon yet (a new server), start the unit now, after its
# drop-ins (scheduling policy, metadata filter first): the daemon the release tool then
# use is systemd's (restarted if it dies) instead of one spawned inside the deploy's SSH session,
# which came under systemd only at the first reboot.
if systemd_running; then
    if systemctl is-active --quiet "$pm2_unit"; then
        say "pm2 daemon: ok (already running under $pm2_unit)"
    elif pgrep -u "$app_user" -f '^PM2 v[0-9.]+: God Daemon' >/dev/null; then
        say "pm2 daemon: ok (left running; it comes under $pm2_unit at the next boot)"
    else
        systemctl start "$pm2_unit"
        say "pm2 daemon: started $pm2_unit"
    fi
fi

# ---------------------------------------------------------------------------- release tool
# (install_release_tool: lib.sh)
/usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "the release tool needs Python 3.11 or newer (/usr/bin/python3)"
if [ ! -s "$bundle/cognivern-release" ]; then
    say "release tool: skipped (not on stdin: it has a command of its own)"
else
    install_release_tool "$bundle" "$bin_dir"
fi

# ---------------------------------------------------------------------------- logrotate
lr_file="$logrotate_dir/cognivern"
cat >"$tmpdir/logrotate" <<EOF
# Managed by cognivern-infra: rotate the app's PM2 logs (copytruncate: PM2 keeps its file open).
$root/shared/logs/*.log {
    daily
    rotate 14
    compress
    delaycompress
    missingok
    notifempty
    copytruncate
    su $app_user $app_user
}
EOF
if cmp -s "$tmpdir/logrotate" "$lr_file"; then
    say "logrotate: ok (already $lr_file)"
else
    install -d -m 0755 "$logrotate_dir"
    install -m 0644 "$tmpdir/logrotate" "$lr_file"
    if command -v logrotate >/dev/null 2>&1 && ! logrotate -d "$lr_file" >"$tmpdir/lr.log" 2>&1; then
        cat "$tmpdir/lr.log" >&2
        die "logrotate rejects $lr_file"
    fi
    say "logrotate: wrote $lr_file"
fi

# ---------------------------------------------------------------------------- nginx default site
# Ours is default_server; the distribution's default site would clash with it.
if [ -e "$sites_enabled/default" ] || [ -L "$sites_enabled/default" ]; then
    rm -f -- "$sites_enabled/default"
    nginx_args_for "$nginx_conf" "$nginx_prefix"
    if ! run_nginx -t >"$tmpdir/nginx.log" 2>&1; then
        say "nginx default site: removed $sites_enabled/default (nginx -t fails until our site is installed; not reloaded)"
    else
        nginx_reload
        say "nginx default site: removed $sites_enabled/default, ${nginx_action:?}"
    fi
else
    say "nginx default site: ok (already absent)"
fi

# ---------------------------------------------------------------------------- sshd
# sshd_config keeps the FIRST value of a keyword, and the distro config includes
# sshd_config.d/*.conf at its top in lexical order: 10-... wins over cloud-init's 50-cloud-init.conf.
[ -f "$sshd_config" ] || die "$sshd_config does not exist"
dropin_dir="$(dirname "$sshd_config")/sshd_config.d"
dropin="$dropin_dir/10-cognivern-hardening.conf"
cat >"$tmpdir/sshd" <<'EOF'
# Managed by cognivern-infra: keys only. Sorts before 50-cloud-init.conf (first value wins).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
EOF
if cmp -s "$tmpdir/sshd" "$dropin"; then
    say "sshd: ok (already $dropin)"
else
    install -d -m 0755 "$dropin_dir"
    backup=""
    if [ -e "$dropin" ]; then
        backup="$tmpdir/sshd.previous"
        cp -p "$dropin" "$backup"
    fi
    install -m 0644 "$tmpdir/sshd" "$dropin"
    # sshd -t needs its privilege separation directory (present whenever sshd runs).
    [ -d /run/sshd ] || install -d -m 0755 /run/sshd
    if ! /usr/sbin/sshd -t -f "$sshd_config" >"$tmpdir/sshd.log" 2>&1; then
        if [ -n "$backup" ]; then cp -p "$backup" "$dropin"; else rm -f -- "$dropin"; fi
        cat "$tmpdir/sshd.log" >&2
        die "sshd -t rejects the configuration with $dropin; restored the previous state"
    fi
    effective=$(/usr/sbin/sshd -T -f "$sshd_config" 2>/dev/null || true)
    if ! grep -qx 'passwordauthentication no' <<<"$effective"; then
        echo "provision: WARNING: $sshd_config does not apply $dropin (no Include of sshd_config.d/*.conf at its top?); password login is still enabled" >&2
    fi
    # A reload makes sshd re-execute itself (same pid): until the new image has bound again, a
    # connection (the program's next SSH command) is refused. So wait until it listens on new sockets.
    listen_sockets() { # the TCP sockets process $1 listens on: socket:[INODE] lines, sorted
        awk '$4 == "0A" { print "socket:[" $10 "]" }' "/proc/$1/net/tcp" "/proc/$1/net/tcp6" 2>/dev/null | sort -u >"$tmpdir/listen" || true
        find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | sort -u | comm -12 - "$tmpdir/listen" || true
    }
    wait_relisten() { # $1 pid, $2 its sockets before the reload (none known: nothing to wait for)
        local now i
        [ -n "$2" ] || return 0
        for ((i = 0; i < 300; i++)); do
            kill -0 "$1" 2>/dev/null || die "sshd (pid $1) exited after the reload: SSH logins are down; see its log"
            now=$(listen_sockets "$1")
            if [ "$(grep -c . <<<"$now")" -ge "$(grep -c . <<<"$2")" ] && ! grep -qxFf <(printf '%s\n' "$2") <<<"$now"; then
                return 0
            fi
            sleep 0.1
        done
        die "sshd (pid $1) does not listen again 30 s after the reload: SSH logins may be down; see its log"
    }
    if systemd_running; then
        pid=$(systemctl show --property MainPID --value ssh.service 2>/dev/null || true)
        # socket activation (ssh.socket): systemd holds the listening socket, nothing is refused
        if systemctl is-active --quiet ssh.socket || ! [[ $pid =~ ^[1-9][0-9]*$ ]]; then pid=0; fi
        before=$(listen_sockets "$pid")
        systemctl try-reload-or-restart ssh.service
        wait_relisten "$pid" "$before"
        reloaded="ssh.service reloaded"
    elif [ -n "$sshd_pidfile" ] && [ -s "$sshd_pidfile" ]; then
        pid=$(cat "$sshd_pidfile")
        [[ $pid =~ ^[0-9]+$ ]] || die "$sshd_pidfile does not hold a process id"
        before=$(listen_sockets "$pid")
        kill -HUP "$pid"
        wait_relisten "$pid" "$before"
        reloaded="sshd (pid $pid) reloaded"
    else
        reloaded="reload skipped: no systemd and no COGNIVERN_SSHD_PIDFILE"
    fi
    say "sshd: wrote $dropin (password login off), $reloaded"
fi

say "done"
