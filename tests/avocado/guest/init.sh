#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# /init of the Curling test guest: a busybox initramfs that runs one workload
# on the serial console.  Kernel command line:
#   curling.workload=NAME  program under /bin to run (default curling-counter)
#   curling.mode=shell     start a shell on the console instead
#   curling.vga=1          also copy the workload's output to the VGA text
#                          console (/dev/tty0), with the cursor hidden
#   curling.modules=0      do not load the kernel modules of the initramfs
#   curling.ip=ADDR/LEN    configure eth0 with this address
#   curling.serve=1        also run curling-netserve (network services)
#   curling.poweroff=SECS  power the machine off SECS seconds after boot
# Every other curling.* option is read by the workload from /proc/cmdline.
#
# The kernel modules in /lib/modules are loaded first, in the order of
# /lib/modules/load-order (dependencies first).  A module that does not load
# is reported as "curling: module NAME failed" and the guest goes on.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

workload=curling-counter
mode=
vga=
modules=1
ip=
serve=
poweroff=
for opt in $(cat /proc/cmdline); do
    case "$opt" in
    curling.workload=*) workload="${opt#curling.workload=}" ;;
    curling.mode=*) mode="${opt#curling.mode=}" ;;
    curling.vga=*) vga="${opt#curling.vga=}" ;;
    curling.modules=*) modules="${opt#curling.modules=}" ;;
    curling.ip=*) ip="${opt#curling.ip=}" ;;
    curling.serve=*) serve="${opt#curling.serve=}" ;;
    curling.poweroff=*) poweroff="${opt#curling.poweroff=}" ;;
    esac
done

console=/dev/ttyS0
[ -c "$console" ] || console=/dev/console

if [ "$modules" != 0 ] && [ -r /lib/modules/load-order ]; then
    while read -r ko; do
        [ -n "$ko" ] || continue
        insmod "/lib/modules/$ko" >/dev/null 2>&1 ||
            echo "curling: module ${ko%.ko} failed" >"$console"
    done </lib/modules/load-order
fi

ip link set lo up 2>/dev/null
if [ -n "$ip" ]; then
    { ip addr add "$ip" dev eth0 && ip link set eth0 up; } >/dev/null 2>&1 ||
        echo "curling: cannot configure eth0 with $ip" >"$console"
fi
if [ -n "$poweroff" ]; then
    { sleep "$poweroff"; echo "curling: power off" >"$console"; sync
      poweroff -f; } &
fi
if [ "$serve" = 1 ]; then
    /bin/curling-netserve >"$console" 2>&1 &
fi

if [ "$mode" = shell ]; then
    echo "curling: shell" >"$console"
    exec setsid cttyhack sh <"$console" >"$console" 2>&1
fi

echo "curling: init workload=$workload" >"$console"
if [ "$vga" = 1 ] && [ -c /dev/tty0 ]; then
    # A blinking cursor would make two screenshots of one state differ.
    printf '\033[?25l' >/dev/tty0
    { "/bin/$workload" <"$console" 2>&1
      echo "curling: workload exited rc=$?"; } | tee /dev/tty0 >"$console"
else
    "/bin/$workload" <"$console" >"$console" 2>&1
    echo "curling: workload exited rc=$?" >"$console"
fi
exec setsid cttyhack sh <"$console" >"$console" 2>&1
