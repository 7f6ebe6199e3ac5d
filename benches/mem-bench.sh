#!/usr/bin/env bash
# mem-bench.sh: waypost's memory for a large cluster, next to CoreDNS's sizing formula.
#
# One command, as root, from the repository root:
#     bash benches/mem-bench.sh
#
# Generates SERVICES services with ~ENDPOINTS endpoints, one pod each (default 10k / 100k / 100k),
# starts waypost on the state file, waits until it answers for the last service, and prints its
# RSS (after load, and after a short query load) next to CoreDNS's documented estimate for default
# settings, "MB required = (Pods + Services) / 1000 + 54" (coredns/deployment,
# kubernetes/Scaling_CoreDNS.md; it bakes in 30 MB of a full 10000-entry cache and a 5 MB query
# buffer). With PEERS=1 it also starts Knot, NSD and unbound on the same records as zone data.
#
# WAYPOST_ARGS adds flags to `waypost run` (e.g. "--pod-records verified", which keeps the pods).
# Environment overrides: SERVICES [10000], ENDPOINTS [100000], PEERS [1], SEED [1], SETTLE [15],
# PORT_BASE [15400], UNBOUND_MODE [local], RESULTS [target/mem-bench/<timestamp>], SKIP_BUILD=1.
set -euo pipefail

SERVICES=${SERVICES:-10000}
ENDPOINTS=${ENDPOINTS:-100000}
PEERS=${PEERS:-1}
SEED=${SEED:-1}
PORT_BASE=${PORT_BASE:-15400}
UNBOUND_MODE=${UNBOUND_MODE:-local}
ZONE=cluster.local
TARGET=${CARGO_TARGET_DIR:-target}
RESULTS=${RESULTS:-target/mem-bench/$(date -u +%Y%m%dT%H%M%SZ)}

ME=mem-bench
# shellcheck source=benches/dns-servers.sh
source "$(dirname "${BASH_SOURCE[0]}")/dns-servers.sh"

[[ -f Cargo.toml && -d benches/clustergen ]] || die "run from the waypost repository root"
[[ $(id -u) -eq 0 ]] || die "run as root (apt-get install, taskset)"

(( PEERS )) && ensure_peers
command -v dig >/dev/null && command -v dnsperf >/dev/null || ensure_peers
build_release waypost-clustergen waypost
GEN=$TARGET/release/waypost-clustergen
WAYPOST=$TARGET/release/waypost
[[ -x $GEN && -x $WAYPOST ]] || die "release binaries missing under $TARGET/release"

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$RESULTS/work
data=$WORK/data
mkdir -p "$data"

# The generator makes ~85% ClusterIP, ~10% headless, ~5% ExternalName services; give ClusterIP
# services 10 endpoints and headless ones 15 so the total lands near ENDPOINTS.
per=$(awk -v e="$ENDPOINTS" -v s="$SERVICES" 'BEGIN { v = e / (s * (0.85 + 0.10 * 1.5)); printf "%d", (v < 1 ? 1 : v + 0.5) }')
per_headless=$(awk -v p="$per" 'BEGIN { printf "%d", p * 1.5 + 0.5 }')
log "generating $SERVICES services, ~$ENDPOINTS endpoints ($per per ClusterIP, $per_headless per headless service)"
"$GEN" --services "$SERVICES" --seed "$SEED" --zone "$ZONE" --out "$data" --queries 20000 \
    --endpoints-per-clusterip "$per" --endpoints-per-headless "$per_headless" 2>"$RESULTS/gen.txt" \
    || { cat "$RESULTS/gen.txt" >&2; die "waypost-clustergen failed"; }
cat "$RESULTS/gen.txt" >&2
read -r services endpoints pods < <(sed -E 's/.*: ([0-9]+) services in [0-9]+ namespaces, ([0-9]+) endpoints, ([0-9]+) pods.*/\1 \2 \3/' "$RESULTS/gen.txt")
[[ -n ${pods:-} ]] || die "could not read the generated counts from $RESULTS/gen.txt"
ls -l "$data" >&2

# The last service in the state file: when it answers, the whole file is loaded.
last=$(awk -F'\t' '$4 == "A" && $1 ~ /^svc-/ { n = $1 } END { print n }' "$data/$ZONE.zone")

t0=$(date +%s.%N)
wp_ok=1
if ! START_TIMEOUT=${START_TIMEOUT:-300} start_server waypost "$data"; then
    wp_ok=0
    wp_fail="waypost did not answer within ${START_TIMEOUT:-300} s of starting (see the ERROR line above for its RSS and CPU then)"
fi
if (( wp_ok )); then
    until [[ -n $(dig @127.0.0.1 -p "$(port_of waypost)" +short +tries=1 +time=1 "$last" A) ]]; do
        kill -0 "${PID[waypost]}" 2>/dev/null || die "waypost exited (log: $WORK/waypost/log)"
        sleep 0.2
    done
    load_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    sleep 1
    status() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/${PID[$1]}/status"; }
    wp_rss=$(status waypost VmRSS); wp_hwm=$(status waypost VmHWM); wp_pss=$(mem_kb "${PID[waypost]}" Pss)
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$(port_of waypost)" -d "$data/queries.txt" -l 3 -c 8 -q 200 -t 1 \
        >"$RESULTS/dnsperf-waypost.txt" 2>&1 || die "dnsperf against waypost failed"
    wp_rss_q=$(status waypost VmRSS); wp_hwm_q=$(status waypost VmHWM)
    # mimalloc hands memory freed after the load back over the next seconds.
    sleep "${SETTLE:-15}"
    wp_rss_s=$(status waypost VmRSS)
    stop_server waypost
fi

declare -A peer_rss=()
if (( PEERS )); then
    for s in knot nsd unbound; do
        start_server "$s" "$data" || die "$s did not start"
        sleep 1
        peer_rss[$s]=$(mem_kb "${PID[$s]}" VmRSS)/$(mem_kb "${PID[$s]}" Pss)
        stop_server "$s"
    done
fi

coredns_mb=$(awk -v p="$pods" -v s="$services" 'BEGIN { printf "%.0f", (p + s) / 1000 + 54 }')
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k * 1024 / 1e6 }'; }
{
    echo "# waypost memory, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Cluster: $services services, $endpoints endpoints, $pods pods ($(du -h "$data/state.yaml" | cut -f1) state.yaml, $(grep -vc '^[;$]' "$data/$ZONE.zone") DNS records)."
    if (( wp_ok )); then echo "waypost answered for the last service ${load_s}s after start."; else echo "**$wp_fail**"; fi
    echo
    echo "| what | MB (10^6 bytes) |"
    echo "|---|---:|"
    if (( wp_ok )); then
        echo "| waypost RSS after load | $(mb "$wp_rss") |"
        echo "| waypost peak RSS (VmHWM) during load | $(mb "$wp_hwm") |"
        echo "| waypost PSS after load | $(mb "$wp_pss") |"
        echo "| waypost RSS after 3 s of queries (peak) | $(mb "$wp_rss_q") ($(mb "$wp_hwm_q")) |"
        echo "| waypost RSS ${SETTLE:-15} s later (settled) | $(mb "$wp_rss_s") |"
    fi
    echo "| CoreDNS formula, default settings: (pods + services) / 1000 + 54 | $coredns_mb |"
    for s in knot nsd unbound; do
        [[ -n ${peer_rss[$s]:-} ]] || continue
        echo "| $s RSS / PSS on the same records as a zone | $(mb "${peer_rss[$s]%/*}") / $(mb "${peer_rss[$s]#*/}") |"
    done
    echo
    echo "The CoreDNS figure is its documented estimate (30 MB of it is a full default cache), not a measurement here."
} | tee "$RESULTS/report.md"
(( wp_ok )) || die "$wp_fail"
