#!/usr/bin/env bash
# dns-servers.sh: shared by dns-bench.sh and mem-bench.sh (sourced, not run). Installs the peers,
# builds the release binaries, writes the peers' configurations from a generated zone file, and
# starts, measures and stops the servers, each pinned to core 0.
#
# The sourcing script sets: ME (log prefix), ZONE, PORT_BASE, UNBOUND_MODE, WORK (scratch dir),
# WAYPOST (binary path); it may set SKIP_BUILD=1.

die() { echo "$ME: ERROR: $*" >&2; exit 1; }
log() { echo "$ME: $*" >&2; }

# Installs knot, nsd, unbound, dnsperf and dig with apt-get when any is missing; fails loudly.
ensure_peers() {
    local c need_install=0
    for c in knotd nsd unbound dnsperf dig taskset; do
        command -v "$c" >/dev/null || need_install=1
    done
    if (( need_install )); then
        log "installing knot nsd unbound dnsperf bind9-dnsutils with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2 || die "apt-get update failed"
        apt-get install -y -q knot nsd unbound dnsperf bind9-dnsutils >&2 \
            || die "apt-get install of knot nsd unbound dnsperf bind9-dnsutils failed"
    fi
    for c in knotd nsd unbound dnsperf dig taskset; do
        command -v "$c" >/dev/null || die "$c is still missing after apt-get install; cannot benchmark"
    done
}

# cargo build --release of the given packages, unless SKIP_BUILD=1.
build_release() {
    [[ ${SKIP_BUILD:-0} == 1 ]] && return 0
    local pkgs=() p
    for p in "$@"; do pkgs+=(-p "$p"); done
    log "cargo build --release ${pkgs[*]}"
    cargo build --release "${pkgs[@]}" >&2 || die "cargo build --release ${pkgs[*]} failed"
}

HZ=$(getconf CLK_TCK)

# --- process bookkeeping: only the PIDs this script started are ever signalled -------------------
declare -A PID=()
cleanup() {
    local s
    for s in "${!PID[@]}"; do stop_server "$s"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_of() {
    case $1 in waypost) echo $((PORT_BASE + 1)) ;; knot) echo $((PORT_BASE + 2)) ;;
        nsd) echo $((PORT_BASE + 3)) ;; unbound) echo $((PORT_BASE + 4)) ;; *) die "unknown server $1" ;; esac
}

# PIDs of a process and all its descendants (NSD forks its xfrd and server children).
tree_pids() {
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            keep[root] = 1; changed = 1
            while (changed) { changed = 0
                for (i in pids) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } } }
            for (p in keep) print p
        }'
}

# utime+stime of the whole tree, in seconds.
cpu_seconds() {
    local total=0 p t
    for p in $(tree_pids "$1"); do
        # Fields after the ")" that closes comm: state is 3rd, utime 14th, stime 15th.
        t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
        total=$((total + ${t:-0}))
    done
    awk -v t="$total" -v hz="$HZ" 'BEGIN { printf "%.3f", t / hz }'
}

# Sum over the tree of one /proc field: "VmRSS" from status, or "Pss" from smaps_rollup (kB).
mem_kb() {
    local field=$2 total=0 p v file
    [[ $field == Pss ]] && file=smaps_rollup || file=status
    for p in $(tree_pids "$1"); do
        v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$p/$file" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# --- server configurations --------------------------------------------------------------------
write_knot_conf() { # dir port zonefile
    cat >"$1/knot.conf" <<EOF
server:
    listen: 127.0.0.1@$2
    rundir: $1
    pidfile: $1/knot.pid
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: $1
log:
  - target: stderr
    any: warning
template:
  - id: default
    storage: $1
    journal-content: none
    zonefile-sync: -1
    zonefile-load: whole
    semantic-checks: off
zone:
  - domain: $ZONE
    file: $3
EOF
}

write_nsd_conf() { # dir port zonefile
    cat >"$1/nsd.conf" <<EOF
server:
    server-count: 1
    ip-address: 127.0.0.1@$2
    port: $2
    do-ip6: no
    reuseport: no
    username: ""
    chroot: ""
    zonesdir: "$1"
    database: ""
    zonelistfile: "$1/zone.list"
    xfrdfile: "$1/xfrd.state"
    xfrdir: "$1"
    pidfile: "$1/nsd.pid"
    logfile: "$1/nsd.log"
    verbosity: 0
    zonefiles-check: no
    zonefiles-write: 0
    # Debian builds NSD with response rate limiting on (200 qps per client prefix): a benchmark
    # from one address would be throttled, so switch it off.
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: $ZONE
    zonefile: "$3"
EOF
}

write_unbound_conf() { # dir port zonefile
    {
        cat <<EOF
server:
    interface: 127.0.0.1@$2
    port: $2
    num-threads: 1
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "$1"
    pidfile: "$1/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 0
    do-ip6: no
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    module-config: "iterator"
    num-queries-per-thread: 4096
    outgoing-range: 8192
    trust-anchor-signaling: no
    root-key-sentinel: no
EOF
        if [[ $UNBOUND_MODE == auth ]]; then
            cat <<EOF
auth-zone:
    name: "$ZONE"
    zonefile: "$3"
    for-downstream: yes
    for-upstream: no
    fallback-enabled: no
EOF
        else
            # local-zone "static": names not in local-data get NXDOMAIN/NODATA with the SOA.
            echo "    local-zone: \"$ZONE.\" static"
            grep -v '^[;$]' "$3" | awk -F'\t' 'NF >= 5 { printf "    local-data: \047%s %s IN %s %s\047\n", $1, $2, $4, $5 }'
        fi
    } >"$1/unbound.conf"
}

# Starts server $1 for data dir $2, pinned to core 0, and waits (START_TIMEOUT s, default 120)
# until it answers. On failure it says why, stops what it started and returns 1.
start_server() {
    local s=$1 data=$2 port dir timeout=${START_TIMEOUT:-120}
    port=$(port_of "$s")
    dir=$WORK/$s
    rm -rf "$dir"; mkdir -p "$dir"
    case $s in
        waypost)
            # WAYPOST_KUBECONFIG: watch an API server (the churn run) instead of the state file.
            local source=(--state "$data/state.yaml")
            [[ -n ${WAYPOST_KUBECONFIG:-} ]] && source=(--kubeconfig "$WAYPOST_KUBECONFIG")
            taskset -c 0 "$WAYPOST" run "${source[@]}" --dns-listen "127.0.0.1:$port" \
                --cluster-domain "$ZONE" --ttl 5 --dns-workers 1 ${WAYPOST_ARGS:-} >"$dir/log" 2>&1 &
            ;;
        knot)
            write_knot_conf "$dir" "$port" "$data/$ZONE.zone"
            taskset -c 0 knotd -c "$dir/knot.conf" >"$dir/log" 2>&1 &
            ;;
        nsd)
            write_nsd_conf "$dir" "$port" "$data/$ZONE.zone"
            taskset -c 0 nsd -d -c "$dir/nsd.conf" >"$dir/log" 2>&1 &
            ;;
        unbound)
            write_unbound_conf "$dir" "$port" "$data/$ZONE.zone"
            taskset -c 0 unbound -d -c "$dir/unbound.conf" >"$dir/log" 2>&1 &
            ;;
    esac
    PID[$s]=$!
    local t0=$SECONDS
    until dig @127.0.0.1 -p "$port" +tries=1 +time=1 +short "dns-version.$ZONE" TXT 2>/dev/null | grep -q 1.1.0; do
        if ! kill -0 "${PID[$s]}" 2>/dev/null; then
            tail -20 "$dir/log" >&2
            wait "${PID[$s]}" 2>/dev/null || true
            unset 'PID[$s]'
            echo "$ME: ERROR: $s exited while starting (log: $dir/log)" >&2
            return 1
        fi
        if (( SECONDS - t0 >= timeout )); then
            tail -5 "$dir/log" >&2
            echo "$ME: ERROR: $s did not answer within $timeout s (RSS then $(($(mem_kb "${PID[$s]}" VmRSS) / 1024)) MiB, CPU $(cpu_seconds "${PID[$s]}") s; log: $dir/log)" >&2
            stop_server "$s"
            return 1
        fi
        sleep 0.2
    done
    log "$s up on 127.0.0.1:$port after $((SECONDS - t0)) s (pid ${PID[$s]}, RSS $(($(mem_kb "${PID[$s]}" VmRSS) / 1024)) MiB)"
}

stop_server() {
    local s=$1 pid=${PID[$1]:-}
    [[ -n $pid ]] || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset 'PID[$s]'
}

