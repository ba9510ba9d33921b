#!/bin/sh
# /init of the kernel attach test VM (built by scripts/vm/initramfs.ts, booted by
# scripts/vm/kernel-test.ts). It attaches clonebd exports with Debian's nbd-client and the real
# nbd.ko, exercises them, and reports every step on the console as one line:
#
#   STEP <job>.<step> ok|fail <detail>
#
# The host checks the steps it expects, in order; the first failure ends the run (the VM powers
# off). Jobs come from the kernel command line, one per export:
#
#   clonebd.job=<job>,fs,<export>                     mkfs, mount, fsck, reattach, fio
#   clonebd.job=<job>,clone,<export>,<sha256>,<bytes>  the same, after checking the first <bytes>
#   clonebd.job=<job>,restart,<export>,<client>,<timeout>,<hold>
#                                                     I/O held across a server restart
#
# The guest has no network. Each job has its own virtio-serial port (named clonebd.<job>) whose
# host end is a QEMU socket chardev connected to the server, reconnecting whenever the server
# closes it. socat listens on /run/<job>.sock for the client (nbd-client -unix, qemu-nbd) and
# runs `/init relay` for each connection: it opens the port, waits for a greeting from the host
# (the server speaks first, so "NBDMAGIC" proves a new connection), then copies bytes both ways
# until the host side closes. So every client connection, reconnects included, gets its own
# server connection; one at a time per port, since a port opens only once. The host connection ends when the server closes
# it (after NBD_CMD_DISC, or when it stops); virtio-serial has no way to pass on a client that
# just hangs up, so until the server closes, the port stays taken.
#
# The host asks for server restarts with "HOST <request> <job>" lines and answers on the console.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin

relay() { # port
	local magic
	# Until a server is connected behind the port, reads end at once. The port stays open while
	# we wait: the guest drops whatever arrives for a port that is closed, greeting included.
	until magic=$(dd bs=1 count=8 <&3 2>/dev/null) && [ -n "$magic" ]; do sleep 0.1; done
	[ "$magic" = NBDMAGIC ] || return 0
	printf NBDMAGIC
	# An asynchronous list reads /dev/null unless given another descriptor for its input.
	cat <&4 >&3 &
	to_host=$!
	cat <&3
	# The host closed: end the client's connection too, so the kernel sees the server go away.
	kill $to_host 2>/dev/null
	# Counted, so that a step can tell when the connection behind a device is gone.
	echo ended >>"/run/${1##*/}.ended"
	return 0
}

if [ "$1" = relay ]; then
	exec 4<&0
	# The port opens once at a time: wait while the previous connection's relay lets go of it.
	until relay "$2" 3<>"$2"; do sleep 0.1; done 2>/dev/null
	exit 0
fi

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# qemu-nbd -c keeps a socket in /var/lock.
mkdir -p /run /tmp /mnt /var/lock
# The console, for host requests made from inside a step (whose output is captured and whose
# input, as a background job's, is /dev/null).
exec 5>&1 6<&0

# ---- reporting --------------------------------------------------------------------------------

finish() {
	echo "STEP end $1"
	sync
	poweroff -f
}

# Runs "$@" as step $name, in a subshell so that a step stuck for STEP_LIMIT seconds can be
# abandoned and reported; its last output line is the detail. A failure ends the run.
STEP_LIMIT=90
run() {
	local name=$1 step watchdog status
	shift
	("$@") >/tmp/out 2>&1 &
	step=$!
	(sleep $STEP_LIMIT && kill $step) >/dev/null 2>&1 &
	watchdog=$!
	wait $step
	status=$?
	kill $watchdog 2>/dev/null
	if [ $status -eq 0 ]; then
		echo "STEP $name ok $(tail -n 1 /tmp/out | tr -d '\r' | cut -c1-200)"
		return
	fi
	[ $status -gt 128 ] && echo "stuck for $STEP_LIMIT s" >>/tmp/out
	echo "STEP $name fail $(tail -n 2 /tmp/out | tr -d '\r' | tr '\n' ' ' | cut -c1-300)"
	sed 's/^/output: /' /tmp/out | tail -n 40
	for log in /tmp/*.log; do
		[ -f "$log" ] && tail -n 20 "$log" | sed "s|^|${log#/tmp/}: |"
	done
	ps -o pid,ppid,stat,args | grep -v ' \[' | sed 's/^/ps: /'
	for fd in /proc/[0-9]*/fd/*; do
		case "$(readlink "$fd")" in /dev/vport*) echo "port: $fd -> $(readlink "$fd")" ;; esac
	done
	dmesg | tail -n 40 | sed 's/^/dmesg: /'
	finish fail
}

# Hundredths of a second since boot.
now() {
	local up rest
	read -r up rest </proc/uptime
	echo "${up%.*}${up#*.}"
}

# wait_for SECONDS COMMAND...: polls COMMAND until it succeeds or SECONDS pass.
wait_for() {
	local limit=$(($1 * 100)) start
	shift
	start=$(now)
	until "$@" >/dev/null 2>&1; do
		if [ $(($(now) - start)) -ge "$limit" ]; then
			echo "not within $((limit / 100)) s"
			return 1
		fi
		sleep 0.1
	done
	echo "after $((($(now) - start) * 10)) ms"
}

# host REQUEST JOB: asks the host to do something and waits for its answer.
host() {
	local answer
	echo "HOST $1 $2" >&5
	read -r answer <&6
	[ "$answer" = "$1 done" ] || { echo "host answered: $answer"; return 1; }
	echo "host: $answer"
}

# ---- checks -----------------------------------------------------------------------------------

port_device() {
	for port in /sys/class/virtio-ports/*; do
		if [ "$(cat "$port/name")" = "clonebd.$1" ]; then
			echo "/dev/${port##*/}"
			return 0
		fi
	done
	return 1
}

start_bridge() {
	port=$(port_device "$1") || { echo "no virtio-serial port named clonebd.$1"; return 1; }
	socat "UNIX-LISTEN:/run/$1.sock,fork,unlink-early" "EXEC:/init relay $port" 2>"/tmp/$1.socat.log" &
	wait_for 10 test -S "/run/$1.sock"
}

describe_queue() {
	q=/sys/block/$1/queue
	echo "size=$(($(cat /sys/block/$1/size) * 512)) logical_block=$(cat $q/logical_block_size)" \
		"discard_max=$(cat $q/discard_max_bytes) write_zeroes_max=$(cat $q/write_zeroes_max_bytes)" \
		"write_cache=$(cat $q/write_cache | tr ' ' _) fua=$(cat $q/fua)"
}

attach() { # job export device [nbd-client options]
	local job=$1 export=$2 device=$3
	shift 3
	nbd-client -unix "/run/$job.sock" -N "$export" "$@" "$device" || return 1
	describe_queue "${device#/dev/}"
}

detach() { # device [nbd-client options]
	local device=$1
	shift
	nbd-client "$@" -d "$device" || return 1
	wait_for 10 not_connected "$device"
}

not_connected() {
	! nbd-client -c "$1"
}

connected() {
	nbd-client -c "$1"
}

check_prefix() { # device sha256 bytes
	sum=$(head -c "$3" "$1" | sha256sum | cut -d' ' -f1)
	[ "$sum" = "$2" ] || { echo "first $3 bytes hash to $sum, want $2"; return 1; }
	echo "first $3 bytes match"
}

write_file() { # path bytes
	dd if=/dev/urandom of="$1" bs=1M count=$(($2 / 1048576)) conv=fsync 2>/dev/null || return 1
	sha256sum "$1" | cut -d' ' -f1 >"$1.sum"
	cat "$1.sum"
}

check_file() { # path expected-sum-file
	sum=$(sha256sum "$1" | cut -d' ' -f1)
	[ "$sum" = "$(cat "$2")" ] || { echo "$1 hashes to $sum, want $(cat "$2")"; return 1; }
	echo "$1 matches"
}

fio_randrw() {
	fio --name=randrw --filename="$1" --rw=randrw --bs=4k --size=256M --runtime=3 --time_based \
		--ioengine=libaio --iodepth=32 --direct=1 --output-format=terse --terse-version=3 >/tmp/fio || {
		cat /tmp/fio
		return 1
	}
	# terse v3: read IOPS in field 8, write IOPS in field 49
	awk -F';' '{ print "read_iops=" $8 " write_iops=" $49 }' /tmp/fio
}

fio_verify() {
	fio --name=verify --filename="$1" --rw=randwrite --bs=16k --size=16M --ioengine=libaio \
		--iodepth=16 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
		--output-format=terse --terse-version=3 >/tmp/fio || {
		cat /tmp/fio
		return 1
	}
	echo "16 MiB written and verified"
}

write_raw() { # device offset-MiB file
	dd if=/dev/urandom of="$3" bs=1M count=4 2>/dev/null &&
		dd if="$3" of="$1" bs=1M seek="$2" oflag=direct conv=fsync 2>/dev/null &&
		echo "4 MiB at $2 MiB"
}

check_raw() { # device offset-MiB file
	dd if="$1" of=/tmp/readback bs=1M skip="$2" count=4 iflag=direct 2>/dev/null || return 1
	cmp /tmp/readback "$3" && echo "4 MiB at $2 MiB read back"
}

# ---- restart jobs -------------------------------------------------------------------------------
#
# The server restarts while the device is attached, and I/O starts while it is down. Two
# clients, the job's <client>:
#
#   nbd-client  Debian's newest (sid's, run as nbd-client-sid) over netlink with -persist,
#               -timeout and -dead-timeout <hold>: the kernel holds I/O on the dead connection for
#               <hold> seconds, waiting for nbd-client to hand it a new socket
#               (NBD_CMD_RECONFIGURE). If that I/O fails instead, it must not fail sooner, and the
#               device is detached and attached again. (nbd-client 3.27.1 exits once the device
#               is set up, -persist or not, so nothing hands the kernel a new socket.)
#   qemu-nbd    qemu-nbd -c with its NBD driver's reconnect-delay=<hold>: the kernel's socket
#               goes to qemu-nbd and never breaks; qemu-nbd holds the I/O and reconnects to the
#               server by itself. The held I/O must complete.

# nbd-client over netlink; its output is kept in a log, with its exit status if it ends (it
# takes the device without /dev/).
attach_nbd_client() { # job export device timeout hold
	local job=$1 export=$2 device=$3 timeout=$4 hold=$5
	(
		nbd-client-sid -unix "/run/$job.sock" -N "$export" -persist -timeout "$timeout" -dead-timeout "$hold" "${device#/dev/}" &
		echo $! >"/tmp/$job.pid"
		wait $!
		echo "nbd-client exited with $?"
	) >"/tmp/$job.client.log" 2>&1 &
	wait_for "$timeout" connected "$device" >/dev/null || return 1
	echo "$(describe_queue "${device#/dev/}"); nbd-client: $(tail -n 1 "/tmp/$job.client.log")"
}

# qemu-nbd -c forks a daemon once the device is attached; its pid is the device's.
attach_qemu_nbd() { # job export device hold
	local job=$1 export=$2 device=$3 hold=$4
	qemu-nbd -c "$device" --image-opts \
		"driver=nbd,server.type=unix,server.path=/run/$job.sock,export=$export,reconnect-delay=$hold" \
		>"/tmp/$job.client.log" 2>&1 || return 1
	wait_for 10 connected "$device" >/dev/null || return 1
	cat "/sys/block/${device#/dev/}/pid" >"/tmp/$job.pid"
	echo "$(describe_queue "${device#/dev/}"); qemu-nbd $(cat "/tmp/$job.pid")"
}

attach_client() { # client job export device timeout hold
	case "$1" in
	nbd-client) attach_nbd_client "$2" "$3" "$4" "$5" "$6" ;;
	qemu-nbd) attach_qemu_nbd "$2" "$3" "$4" "$6" ;;
	esac
}

# Disconnects; an nbd-client still watching the device is then told to stop.
detach_client() { # client job device
	local pid
	case "$1" in
	nbd-client) nbd-client-sid -d "${3#/dev/}" || return 1 ;;
	qemu-nbd) qemu-nbd -d "$3" >/dev/null || return 1 ;;
	esac
	wait_for 10 not_connected "$3" >/dev/null || return 1
	pid=$(cat "/tmp/$2.pid")
	if alive "$pid"; then
		kill "$pid"
		wait_for 10 gone "$pid" >/dev/null || return 1
	fi
	echo "detached"
}

alive() { # pid (a zombie is not)
	grep -q '^State:[[:space:]]*[^Z[:space:]]' "/proc/$1/status" 2>/dev/null
}

gone() { # pid
	! alive "$1"
}

# How many connections the relays of the job's port have seen end.
connections_ended() { # job
	local port
	port=$(port_device "$1") || return 1
	cat "/run/${port##*/}.ended" 2>/dev/null | wc -l
}

relay_ended() { # job count-before
	[ "$(connections_ended "$1")" -gt "$2" ]
}

# The process is blocked in the kernel (uninterruptible sleep: waiting for I/O).
blocked() { # pid
	grep -q '^State:[[:space:]]*D' "/proc/$1/status" 2>/dev/null
}

# Runs "$@" in the background, keeping its pid in /tmp/NAME.pid and, once it ends, its exit
# status in /tmp/NAME.rc and its output in /tmp/NAME.log.
background() { # name command...
	local name=$1
	shift
	rm -f "/tmp/$name.pid" "/tmp/$name.rc"
	(
		"$@" &
		echo $! >"/tmp/$name.pid"
		wait $!
		echo $? >"/tmp/$name.rc"
	) >"/tmp/$name.log" 2>&1 &
	wait_for 5 test -s "/tmp/$name.pid" >/dev/null
}

# While the server is down: a read of the 4 MiB written before (at 0 MiB) and a write of 4 MiB
# more (at 8 MiB), in the background; both must be blocked in the kernel.
start_held_io() { # job device
	local job=$1 device=$2 io
	dd if=/dev/urandom of="/tmp/$job.c" bs=1M count=4 2>/dev/null || return 1
	now >"/tmp/$job.held-since"
	background "$job.held-read" dd if="$device" of="/tmp/$job.held" bs=1M count=4 iflag=direct || return 1
	background "$job.held-write" dd if="/tmp/$job.c" of="$device" bs=1M seek=8 oflag=direct conv=fsync || return 1
	for io in read write; do
		wait_for 10 blocked "$(cat "/tmp/$job.held-$io.pid")" >/dev/null || {
			echo "the $io is not blocked$([ -f "/tmp/$job.held-$io.rc" ] && echo ": it ended with status $(cat "/tmp/$job.held-$io.rc")")"
			return 1
		}
	done
	echo "a read and a write blocked"
}

held_io_done() { # job
	[ -f "/tmp/$1.held-read.rc" ] && [ -f "/tmp/$1.held-write.rc" ]
}

# The held read and write end. Both succeed, the read with the data written before; or, with
# nbd-client only, both fail no sooner than the hold time. Writes "resumed" or "failed" to
# /tmp/JOB.held-io for the steps after.
held_io() { # client job hold
	local client=$1 job=$2 hold=$3 since took
	since=$(cat "/tmp/$job.held-since")
	wait_for $((hold + 30)) held_io_done "$job" >/dev/null || { echo "the held I/O did not end within $((hold + 30)) s"; return 1; }
	took=$((($(now) - since) * 10))
	if [ "$(cat "/tmp/$job.held-read.rc")" = 0 ] && [ "$(cat "/tmp/$job.held-write.rc")" = 0 ]; then
		cmp "/tmp/$job.held" "/tmp/$job.a" || return 1
		echo resumed >"/tmp/$job.held-io"
		echo "resumed: read and write done $took ms after they started"
		return 0
	fi
	echo "failed after $took ms: read status $(cat "/tmp/$job.held-read.rc"), write status $(cat "/tmp/$job.held-write.rc")," \
		"$(tail -n 1 "/tmp/$job.held-read.log")"
	[ "$client" = nbd-client ] || return 1
	# The kernel gives up when the hold time has passed since its first wait, which came after
	# "since"; a hundredth of a second is the resolution of both clocks.
	[ "$took" -ge $((hold * 1000 - 10)) ] || { echo "sooner than -dead-timeout $hold"; return 1; }
	echo failed >"/tmp/$job.held-io"
}

# After held I/O that failed, the device is attached again; otherwise it must still be.
reattach_client() { # client job export device timeout hold
	local client=$1 job=$2 export=$3 device=$4 timeout=$5 hold=$6
	if [ "$(cat "/tmp/$job.held-io")" = resumed ]; then
		connected "$device" || { echo "no longer attached"; return 1; }
		echo "still attached"
		return 0
	fi
	detach_client "$client" "$job" "$device" >/dev/null || return 1
	attach_client "$client" "$job" "$export" "$device" "$timeout" "$hold" >/dev/null || return 1
	echo "detached and attached again; $client: $(tail -n 1 "/tmp/$job.client.log")"
}

# The data written before the restart, and the held write if it succeeded.
read_after_restart() { # job device
	check_raw "$2" 0 "/tmp/$1.a" >/dev/null || return 1
	if [ "$(cat "/tmp/$1.held-io")" = resumed ]; then
		check_raw "$2" 8 "/tmp/$1.c" >/dev/null || return 1
		echo "4 MiB at 0 MiB and the held write at 8 MiB read back"
	else
		echo "4 MiB at 0 MiB read back"
	fi
}

# ---- jobs -------------------------------------------------------------------------------------

fs_job() { # job export device
	job=$1 export=$2 device=$3 mnt=/mnt/$1
	mkdir -p "$mnt"
	run "$job.mkfs" mkfs.ext4 -F -q "$device"
	run "$job.mount" mount -t ext4 "$device" "$mnt"
	run "$job.write" write_file "$mnt/data" 8388608
	cp "$mnt/data.sum" "/tmp/$job.sum"
	run "$job.umount" umount "$mnt"
	run "$job.fsck" e2fsck -fn "$device"
	run "$job.detach" detach "$device"
	run "$job.reattach" attach "$job" "$export" "$device"
	run "$job.mount-again" mount -t ext4 "$device" "$mnt"
	run "$job.read" check_file "$mnt/data" "/tmp/$job.sum"
	run "$job.umount-again" umount "$mnt"
	run "$job.fio-randrw" fio_randrw "$device"
	run "$job.fio-verify" fio_verify "$device"
	run "$job.disconnect" detach "$device"
}

restart_job() { # job export device client timeout hold
	job=$1 export=$2 device=$3 client=$4 timeout=$5 hold=$6
	run "$job.attach" attach_client "$client" "$job" "$export" "$device" "$timeout" "$hold"
	run "$job.write" write_raw "$device" 0 "/tmp/$job.a"
	ended=$(connections_ended "$job")
	run "$job.server-stopped" host stop-server "$job"
	run "$job.link-down" wait_for 10 relay_ended "$job" "$ended"
	run "$job.io-held" start_held_io "$job" "$device"
	run "$job.server-started" host start-server "$job"
	run "$job.held-io" held_io "$client" "$job" "$hold"
	run "$job.reattach" reattach_client "$client" "$job" "$export" "$device" "$timeout" "$hold"
	run "$job.read" read_after_restart "$job" "$device"
	run "$job.write-again" write_raw "$device" 16 "/tmp/$job.b"
	run "$job.read-again" check_raw "$device" 16 "/tmp/$job.b"
	run "$job.disconnect" detach_client "$client" "$job" "$device"
}

load_modules() {
	while read -r module; do
		insmod "/lib/modules/$module.ko" || return 1
	done </lib/modules/order
	echo "$(wc -l </lib/modules/order) modules"
}

echo "STEP boot ok $(uname -r)"
run modules load_modules
index=0
for word in $(cat /proc/cmdline); do
	case "$word" in
	clonebd.job=*) ;;
	*) continue ;;
	esac
	IFS=, read -r job kind export arg1 arg2 arg3 <<EOF
${word#clonebd.job=}
EOF
	device=/dev/nbd$index
	index=$((index + 1))
	run "$job.bridge" start_bridge "$job"
	case "$kind" in
	fs)
		run "$job.attach" attach "$job" "$export" "$device"
		fs_job "$job" "$export" "$device"
		;;
	clone)
		run "$job.attach" attach "$job" "$export" "$device"
		run "$job.source-data" check_prefix "$device" "$arg1" "$arg2"
		fs_job "$job" "$export" "$device"
		;;
	restart)
		restart_job "$job" "$export" "$device" "$arg1" "$arg2" "$arg3"
		;;
	*)
		echo "STEP $job.kind fail unknown job kind $kind"
		finish fail
		;;
	esac
done
finish ok
