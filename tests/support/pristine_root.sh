#!/usr/bin/env bash
# Builds a pristine Debian root, the disk of a fresh cloud server (tests/support/pristine_host.py
# caches it per release and recipe; root only; needs debootstrap and Debian's archive keyring).
#
#   pristine_root.sh RELEASE DEST MIRROR PACKAGE,PACKAGE,...
#
# debootstrap's minimal variant plus the packages named (the list and why each is there:
# pristine_host.RECIPES), then what a cloud image build does last: no SSH host keys (cloud-init
# makes them), en_US.UTF-8 built, an empty machine-id (systemd makes one at first boot), no package lists or cached
# packages (the first `apt-get update` fetches them), and the release's updates and security
# suites in the sources, as on Debian's own cloud images.
set -euo pipefail
[ "$#" -eq 4 ] || { echo "usage: pristine_root.sh RELEASE DEST MIRROR PACKAGES" >&2; exit 2; }
release=$1 dest=$2 mirror=$3 packages=$4
[[ $release =~ ^[a-z]+$ ]] || { echo "pristine_root.sh: bad release '$release'" >&2; exit 2; }
[[ $packages =~ ^[a-z0-9.+,-]+$ ]] || { echo "pristine_root.sh: bad package list '$packages'" >&2; exit 2; }

if ! debootstrap --variant=minbase --include="$packages" "$release" "$dest" "$mirror" >"$dest.log" 2>&1; then
    tail -n 20 "$dest.log" >&2
    [ ! -f "$dest/debootstrap/debootstrap.log" ] || tail -n 20 "$dest/debootstrap/debootstrap.log" >&2
    echo "pristine_root.sh: debootstrap $release failed (log above)" >&2
    exit 1
fi

# The image's locale, as an installer or image build sets it: cloud-init's locale module (en_US.UTF-8
# by default) runs Debian's locale-gen, which builds only what /etc/locale.gen lists, then
# update-locale, which refuses a locale that was not built (cloud-init then reports an error).
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)$/\1/' "$dest/etc/locale.gen"
grep -qx 'en_US.UTF-8 UTF-8' "$dest/etc/locale.gen" || { echo "pristine_root.sh: en_US.UTF-8 missing from locale.gen" >&2; exit 1; }
chroot "$dest" /usr/sbin/locale-gen >/dev/null
rm -f "$dest"/etc/ssh/ssh_host_*
: >"$dest/etc/machine-id"
rm -f "$dest/var/lib/dbus/machine-id"
echo localhost >"$dest/etc/hostname"
rm -rf "$dest"/var/lib/apt/lists/* "$dest"/var/cache/apt/*.bin
find "$dest/var/cache/apt/archives" -name '*.deb' -delete
rm -f "$dest/etc/apt/sources.list"
cat >"$dest/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $release $release-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: $release-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
