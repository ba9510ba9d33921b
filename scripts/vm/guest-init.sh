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
#   clonebd.job=<job>,restart,<export>,<timeout>       nbd-client -persist across a server restart
#
# The guest has no network. Each job has its own virtio-serial port (named clonebd.<job>) whose
# host end is a QEMU socket chardev connected to the server, reconnecting whenever the server
# closes it. socat listens on /run/<job>.sock for nbd-client -unix and runs `/init relay` for each
# connection: it opens the port, waits for a greeting from the host (the server speaks first, so
# "NBDMAGIC" proves a new connection), then copies bytes both ways until the host side closes.
# So every nbd-client connection, reconnects included, gets its own server connection; one at a
# time per port, since a port opens only once. The host connection ends when the server closes
# it (after NBD_CMD_DISC, or when it stops); virtio-serial has no way to pass on a client that
# just hangs up, so until the server closes, the port stays taken.
#
# The host asks for server restarts with "HOST <request> <job>" lines and answers on the console.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin

relay() {
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
	return 0
}

if [ "$1" = relay ]; then
	exec 4<&0
	# The port opens once at a time: wait while the previous connection's relay lets go of it.
	until relay 3<>"$2"; do sleep 0.1; done 2>/dev/null
	exit 0
fi

/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /mnt
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

# nbd-client -persist stays in the foreground here (-nofork) so that what it says about
# reconnecting is kept in a log; the device is ready once the kernel has its socket.
attach_persist() { # job export device timeout
	local job=$1 export=$2 device=$3 timeout=$4
	nbd-client -unix "/run/$job.sock" -N "$export" -persist -nonetlink -timeout "$timeout" -nofork "$device" \
		>"/tmp/$job.nbd-client.log" 2>&1 &
	echo $! >"/tmp/$job.pid"
	wait_for "$timeout" connected "$device" || return 1
	describe_queue "${device#/dev/}"
}

alive() { # pid (a zombie is not)
	grep -q '^State:[[:space:]]*[^Z[:space:]]' "/proc/$1/status" 2>/dev/null
}

# The device has its connection back, or nbd-client -persist gave up.
reconnected_or_gone() { # device job
	connected "$1" || ! alive "$(cat "/tmp/$2.pid")"
}

# nbd-client -persist (3.24, ioctl interface) reconnects only when the kernel's NBD_DO_IT fails.
# A server that closes the connection, as a restart does, makes it return 0, and nbd-client then
# ends ("Kernel call returned."). Either way the device must come back with its data: by itself,
# or attached again once the server is back.
reconnect() { # job export device timeout
	local job=$1 export=$2 device=$3 timeout=$4 waited
	waited=$(wait_for "$timeout" reconnected_or_gone "$device" "$job") || return 1
	if connected "$device"; then
		echo "nbd-client -persist reconnected $waited"
		return 0
	fi
	nbd-client -unix "/run/$job.sock" -N "$export" -nonetlink "$device" >>"/tmp/$job.attach.log" 2>&1 || return 1
	echo "nbd-client -persist ended ($(tail -n 2 "/tmp/$job.nbd-client.log" | tr '\n' ' ')$waited); attached again"
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

restart_job() { # job export device timeout
	job=$1 export=$2 device=$3 timeout=$4
	run "$job.attach" attach_persist "$job" "$export" "$device" "$timeout"
	run "$job.write" write_raw "$device" 0 "/tmp/$job.a"
	run "$job.server-stopped" host stop-server "$job"
	run "$job.link-down" wait_for "$timeout" not_connected "$device"
	run "$job.server-started" host start-server "$job"
	run "$job.reconnect" reconnect "$job" "$export" "$device" "$timeout"
	run "$job.read" check_raw "$device" 0 "/tmp/$job.a"
	run "$job.write-again" write_raw "$device" 8 "/tmp/$job.b"
	run "$job.read-again" check_raw "$device" 8 "/tmp/$job.b"
	run "$job.disconnect" detach "$device" -nonetlink
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
	IFS=, read -r job kind export arg1 arg2 <<EOF
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
		restart_job "$job" "$export" "$device" "$arg1"
		;;
	*)
		echo "STEP $job.kind fail unknown job kind $kind"
		finish fail
		;;
	esac
done
finish ok
