#!/usr/bin/env bash
# Boots a pristine root with systemd as PID 1 (tests/support/pristine_host.py runs this; root only).
#
#   pristine_boot.sh CGROUP HOLDER LOWER UPPER WORK MERGED CONSOLE ARCHIVES
#
# CGROUP: an empty cgroup2 directory made for this boot and delegated to the guest's root; this
#   shell moves itself into it, so the new cgroup namespace is rooted there: the guest's systemd
#   manages that subtree only, and `cgroup.kill` on it ends everything the boot started.
# HOLDER: the pid of the process that holds the guest's user and network namespaces (they outlive
#   a reboot, like a server's network card): the guest's root is an unprivileged uid of this
#   machine, so its processes and files never meet this machine's users.
# LOWER/UPPER/WORK: an overlay of the cached base root (read-only, shared by every guest, its
#   owners shifted into the guest's uid range) and this guest's own disk (UPPER): a reboot mounts
#   the same UPPER again.
# MERGED: the overlay's mount point (mounted only in the boot's own mount namespace, so it goes
#   away with the guest's last process).
# CONSOLE: a pty slave, bound as the guest's /dev/console (the caller logs the master side).
# ARCHIVES: a directory bound onto the guest's /var/cache/apt/archives (downloaded packages kept
#   between hosts: apt still checks each against the package lists), or "" for none.
#
# What a container manager does for systemd (systemd-nspawn does the same, and more): `container=`
# in PID 1's environment (systemd then skips udev and the like), fewer capabilities, /sys and
# /proc/sys read-only, a private /dev with only the basic devices.
# Exit status: the guest's PID 1 ended by SIGHUP is a reboot, SIGINT a halt or poweroff (the kernel
# reports reboot(2) in a PID namespace that way), relayed by `unshare --fork`.
set -euo pipefail
[ "$#" -eq 8 ] || { echo "usage: pristine_boot.sh CGROUP HOLDER LOWER UPPER WORK MERGED CONSOLE ARCHIVES" >&2; exit 2; }
cgroup=$1 holder=$2 lower=$3 upper=$4 work=$5 merged=$6 console=$7 archives=$8

echo "$$" >"$cgroup/cgroup.procs"
# Capabilities the guest's root does not get (as systemd-nspawn withholds them; in its user
# namespace they would not reach this machine anyway): loading kernel modules, setting the clock,
# raw I/O, the kernel log, suspend and wake-up timers, MAC policy. systemd-modules-load and the
# time-sync units then skip themselves (ConditionCapability=) instead of failing.
drop=-sys_module,-sys_time,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-mac_admin,-mac_override,-sys_pacct
# The overlay is mounted by this machine's root, in a mount namespace of its own, before the boot
# enters the guest's user namespace: volatile, so the guest's fsyncs stop at the page cache (dpkg
# syncs every file it unpacks: provisioning took 49 s longer without it). A disk outlives a
# reboot, never a crash of this machine; the marker overlayfs leaves in WORK only says that the
# last boot mounted it so. The inner script then runs as the new PID namespace's first process,
# root of the guest's user namespace, and execs systemd in its place.
# shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
inner='set -euo pipefail
m=$1 console=$2 drop=$3
mount -t proc proc "$m/proc"
mount --bind "$m/proc/sys" "$m/proc/sys"
mount --bind "$m/proc/sys/net" "$m/proc/sys/net"
mount -o remount,bind,ro "$m/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$m/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$m/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$m/dev"
for d in null zero full random urandom tty; do
    touch "$m/dev/$d"
    mount --bind "/dev/$d" "$m/dev/$d"
done
mkdir "$m/dev/pts" "$m/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$m/dev/pts"
ln -s pts/ptmx "$m/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$m/dev/shm"
touch "$m/dev/console"
mount --bind "$console" "$m/dev/console"
ln -s /proc/self/fd "$m/dev/fd"
ln -s /proc/self/fd/0 "$m/dev/stdin"
ln -s /proc/self/fd/1 "$m/dev/stdout"
ln -s /proc/self/fd/2 "$m/dev/stderr"
exec setpriv --bounding-set "$drop" env -i container=cognivern-pristine TERM=linux /usr/sbin/chroot "$m" /lib/systemd/systemd --system'
# shellcheck disable=SC2016 # expanded by the outer shell below, from its arguments
outer='set -euo pipefail
lower=$1 upper=$2 work=$3 m=$4 archives=$5 holder=$6 console=$7 drop=$8 inner=$9
rm -rf "$work/work/incompat/volatile"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work,volatile" "$m"
[ -z "$archives" ] || mount --bind "$archives" "$m/var/cache/apt/archives"
exec nsenter --user="/proc/$holder/ns/user" --net="/proc/$holder/ns/net" -- \
    unshare --cgroup --pid --fork --mount --uts --ipc --propagation private bash -c "$inner" pristine-boot "$m" "$console" "$drop"'
exec unshare --mount --propagation private bash -c "$outer" pristine-mount \
    "$lower" "$upper" "$work" "$merged" "$archives" "$holder" "$console" "$drop" "$inner"
