#!/usr/bin/env bash
# kube-latency.sh: waypost on the Kubernetes API source: programming latency under churn, and resident memory.
#
# One command, from the repository root (no root needed):
#     bash benches/kube-latency.sh
#
# Run 1: SERVICES services (default 10k, the generator's default endpoints) preloaded into
# waypost-testapi, which then churns CHURN EndpointSlices a second (flipping an endpoint's
# readiness). waypost watches it with --kubeconfig. After it is ready, the script scrapes
# waypost_programming_latency_seconds (watch event off the wire -> DNS index published, measured
# inside waypost) from /metrics, waits DURATION seconds, scrapes again, and prints p50/p99 of the
# difference (linear interpolation inside histogram buckets) plus VmRSS/VmHWM.
# Run 2: the same with ~ENDPOINTS endpoints and one pod each (default 10k / 100k / 100k) and
# --pod-records verified so Pods are watched; prints VmRSS next to CoreDNS's sizing formula
# "(pods + services) / 1000 + 54" MB (coredns/deployment, Scaling_CoreDNS.md).
#
# Environment overrides: SERVICES [10000], ENDPOINTS [100000], CHURN [100], DURATION [20],
# SEED [1], RUNS ["1 2"], SKIP_BUILD=1, RESULTS [target/kube-latency/<timestamp>].
set -euo pipefail

SERVICES=${SERVICES:-10000}
ENDPOINTS=${ENDPOINTS:-100000}
CHURN=${CHURN:-100}
DURATION=${DURATION:-20}
SEED=${SEED:-1}
RUNS=${RUNS:-"1 2"}
TARGET=${CARGO_TARGET_DIR:-target}
RESULTS=${RESULTS:-target/kube-latency/$(date -u +%Y%m%dT%H%M%SZ)}

log() { echo "kube-latency: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f Cargo.toml && -d benches/clustergen ]] || die "run from the waypost repository root"
if [[ -z ${SKIP_BUILD:-} ]]; then
    cargo build --release -p waypost -p waypost-testapi -p waypost-clustergen >&2 || die "release build failed"
fi
BIN=$TARGET/release
for b in waypost waypost-testapi waypost-clustergen; do [[ -x $BIN/$b ]] || die "$BIN/$b missing"; done
command -v curl >/dev/null || die "curl is needed"

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# histogram FILE: "le count" lines of waypost_programming_latency_seconds, cumulative.
histogram() {
    sed -nE 's/^waypost_programming_latency_seconds_bucket\{le="([^"]+)"\} ([0-9]+)$/\1 \2/p' "$1"
}

# quantiles BEFORE AFTER: p50, p99 and count of the observations between two scrapes.
quantiles() {
    paste <(histogram "$1") <(histogram "$2") | awk '
        { le[NR] = $1; c[NR] = $4 - $2; n = NR }
        END {
            total = c[n]
            if (total == 0) { print "n=0"; exit }
            split("0.5 0.99", qs, " ")
            out = ""
            for (k = 1; k <= 2; k++) {
                want = qs[k] * total; prev_le = 0; prev_c = 0; v = "inf"
                for (i = 1; i <= n; i++) {
                    if (c[i] >= want) {
                        if (le[i] == "+Inf") { v = "> " prev_le " s"; break }
                        frac = (c[i] == prev_c) ? 1 : (want - prev_c) / (c[i] - prev_c)
                        v = sprintf("%.2f ms", 1000 * (prev_le + frac * (le[i] - prev_le)))
                        break
                    }
                    prev_le = le[i]; prev_c = c[i]
                }
                out = out sprintf("p%s=%s  ", qs[k] * 100, v)
            }
            under = 0
            for (i = 1; i <= n; i++) if (le[i] == "0.005") under = c[i]
            printf "%sn=%d  <=5ms: %.2f%%\n", out, total, 100 * under / total
        }'
}

# run NAME GEN_FLAGS WAYPOST_FLAGS: one measured run; prints a report section.
run() {
    local name=$1 gen_flags=$2 wp_flags=$3
    local dir=$RESULTS/$name
    mkdir -p "$dir"
    log "$name: generating ($gen_flags)"
    # shellcheck disable=SC2086
    "$BIN/waypost-clustergen" --services "$SERVICES" --seed "$SEED" --out "$dir/data" --queries 10 $gen_flags \
        2>"$dir/gen.txt" || { cat "$dir/gen.txt" >&2; die "waypost-clustergen failed"; }
    local counts
    counts=$(sed -E 's/.*: ([0-9]+) services in [0-9]+ namespaces, ([0-9]+) endpoints, ([0-9]+) pods.*/\1 \2 \3/' "$dir/gen.txt" | tail -1)
    read -r services endpoints pods <<<"$counts"
    log "$name: $services services, $endpoints endpoints, $pods pods; starting waypost-testapi"
    "$BIN/waypost-testapi" --listen 127.0.0.1:0 --preload "$dir/data/state.yaml" --kubeconfig "$dir/kubeconfig" \
        --churn-per-sec "$CHURN" --history-limit 100000 >"$dir/api.url" 2>"$dir/api.log" &
    PIDS+=($!)
    local api_pid=$!
    until [[ -s $dir/api.url ]]; do kill -0 "$api_pid" 2>/dev/null || die "waypost-testapi exited: $(cat "$dir/api.log")"; sleep 0.2; done

    local t0; t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    "$BIN/waypost" run --kubeconfig "$dir/kubeconfig" --dns-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
        --dns-workers 1 $wp_flags >"$dir/waypost.out" 2>"$dir/waypost.log" &
    PIDS+=($!)
    local wp_pid=$!
    until [[ -s $dir/waypost.out ]]; do kill -0 "$wp_pid" 2>/dev/null || die "waypost exited: $(cat "$dir/waypost.log")"; sleep 0.1; done
    local metrics
    metrics=$(sed -nE 's/.*metrics on ([0-9.:]+).*/\1/p' "$dir/waypost.out")
    until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$metrics/readyz") == 200 ]]; do
        kill -0 "$wp_pid" 2>/dev/null || die "waypost exited: $(cat "$dir/waypost.log")"
        sleep 0.1
    done
    local ready_s; ready_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [[ $wp_flags == *verified* ]]; then
        # (the log has colour codes between the field name and its value)
        until grep -q 'listed.*Pod' "$dir/waypost.log"; do
            kill -0 "$wp_pid" 2>/dev/null || die "waypost exited: $(cat "$dir/waypost.log")"
            sleep 0.2
        done
    fi
    local synced_s; synced_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    sleep 2 # let the first sync's sample and its aftermath pass
    curl -s "http://$metrics/metrics" >"$dir/metrics.before"
    log "$name: ready after ${ready_s}s (all watched kinds listed after ${synced_s}s); measuring ${DURATION}s of churn at ${CHURN}/s"
    sleep "$DURATION"
    curl -s "http://$metrics/metrics" >"$dir/metrics.after"
    local rss hwm
    rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$wp_pid/status")
    hwm=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$wp_pid/status")
    local api_rss; api_rss=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$api_pid/status")
    kill "$wp_pid" "$api_pid" 2>/dev/null || true
    wait "$wp_pid" "$api_pid" 2>/dev/null || true
    local coredns; coredns=$(awk -v p="$pods" -v s="$services" 'BEGIN { printf "%.0f", (p + s) / 1000 + 54 }')
    {
        echo "## $name: $services services, $endpoints endpoints, $pods pods (waypost ${wp_flags:-with default flags})"
        echo
        echo "- ready (Services + EndpointSlices listed, DNS index built) ${ready_s}s after start; every watched kind listed after ${synced_s}s"
        echo "- programming latency, watch event -> DNS index published, ${DURATION}s at ${CHURN} changes/s: $(quantiles "$dir/metrics.before" "$dir/metrics.after")"
        echo "- waypost VmRSS $((rss / 1024)) MiB (peak VmHWM $((hwm / 1024)) MiB); test API server $((api_rss / 1024)) MiB (not counted)"
        echo "- CoreDNS sizing formula for this cluster, (pods + services) / 1000 + 54: $coredns MB"
        echo
    } | tee -a "$RESULTS/report.md"
}

echo "# waypost on the Kubernetes API, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs" | tee "$RESULTS/report.md"
echo | tee -a "$RESULTS/report.md"
for r in $RUNS; do
    case $r in
        1) run small "" "" ;;
        2)
            # ~85% ClusterIP and ~10% headless services: 10 and 15 endpoints (one pod each) land near ENDPOINTS.
            per=$(awk -v e="$ENDPOINTS" -v s="$SERVICES" 'BEGIN { v = e / (s * (0.85 + 0.10 * 1.5)); printf "%d", (v < 1 ? 1 : v + 0.5) }')
            per_headless=$(awk -v p="$per" 'BEGIN { printf "%d", p * 1.5 + 0.5 }')
            run large "--endpoints-per-clusterip $per --endpoints-per-headless $per_headless" "--pod-records verified"
            ;;
        *) die "unknown run $r" ;;
    esac
done
log "report: $RESULTS/report.md"
