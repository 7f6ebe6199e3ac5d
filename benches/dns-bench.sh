#!/usr/bin/env bash
# dns-bench.sh: waypost's cluster DNS against Knot, NSD and unbound, per server CPU-second.
#
# One command, as root, from the repository root:
#     bash benches/dns-bench.sh
#
# For each zone size it generates a cluster with waypost-clustergen (state.yaml for waypost, the same
# records as a zone file for the peers, a dnsperf query mix), starts every server pinned to core 0,
# checks with dig that they all answer alike, then runs dnsperf on core 1 against each server in
# turn, for ROUNDS interleaved rounds, and reports medians. CPU time is the server's own
# (utime+stime of its process tree from /proc), so "queries per CPU-second" holds even when the
# load generator, not the server, is the bottleneck.
#
# Environment overrides (defaults in brackets):
#   SIZES           services per generated cluster            ["1000 10000 50000"]
#   DURATION        seconds per measured dnsperf run           [10]
#   ROUNDS          interleaved rounds; the report takes medians [2]
#   SERVERS         servers to compare                         ["waypost knot nsd unbound"]
#   CLIENTS         dnsperf -c (UDP sockets)                   [8]
#   OUTSTANDING     dnsperf -q (queries in flight)             [200] (500 overflowed
#                   the servers' default socket buffers: ~900 lost per run)
#   LAT_QPS         fixed rate of the latency-distribution run [20000]
#   LAT_DURATION    seconds of the latency-distribution run    [3]  (0 skips it)
#   CHURN_SIZE      services for the churn run                 [1000] (0 skips it)
#   CHURN_RATE      state changes per second in the churn run  [100]
#   UNBOUND_MODE    local (local-zone static + local-data from the zone file) or auth
#                   (auth-zone for-downstream) [local]: local answered ~2x the queries per
#                   CPU-second of auth-zone here (10k services: ~234k vs ~119k) with the same records;
#                   it only differs in not chasing an in-zone CNAME (ExternalName), not in the query mix
#   SEED            generator seed                             [1]
#   PORT_BASE       servers listen on PORT_BASE+1..4           [15300]
#   RESULTS         results directory                          [target/dns-bench/<timestamp>]
#   START_TIMEOUT   seconds a server may take to answer after start [120]
#   SKIP_BUILD=1    use the binaries already built
#   KEEP_DATA=1     keep the generated state.yaml / zone / queries under RESULTS/work
set -euo pipefail

SIZES=${SIZES:-"1000 10000 50000"}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
SERVERS=${SERVERS:-"waypost knot nsd unbound"}
CLIENTS=${CLIENTS:-8}
OUTSTANDING=${OUTSTANDING:-200}
LAT_QPS=${LAT_QPS:-20000}
LAT_DURATION=${LAT_DURATION:-3}
CHURN_SIZE=${CHURN_SIZE:-1000}
CHURN_RATE=${CHURN_RATE:-100}
UNBOUND_MODE=${UNBOUND_MODE:-local}
SEED=${SEED:-1}
PORT_BASE=${PORT_BASE:-15300}
ZONE=cluster.local
TARGET=${CARGO_TARGET_DIR:-target}
RESULTS=${RESULTS:-target/dns-bench/$(date -u +%Y%m%dT%H%M%SZ)}

ME=dns-bench
# shellcheck source=benches/dns-servers.sh
source "$(dirname "${BASH_SOURCE[0]}")/dns-servers.sh"

[[ -f Cargo.toml && -d benches/clustergen ]] || die "run from the waypost repository root"
[[ $(id -u) -eq 0 ]] || die "run as root (apt-get install, taskset)"
(( $(nproc) >= 2 )) || die "needs 2 cores: servers on core 0, dnsperf on core 1"
case $UNBOUND_MODE in auth|local) ;; *) die "UNBOUND_MODE must be auth or local" ;; esac

has_server() { [[ " $SERVERS " == *" $1 "* ]]; }

ensure_peers
if has_server waypost; then build_release waypost-clustergen waypost waypost-testapi; else build_release waypost-clustergen; fi
GEN=$TARGET/release/waypost-clustergen
WAYPOST=$TARGET/release/waypost
[[ -x $GEN ]] || die "$GEN is missing"
if has_server waypost; then [[ -x $WAYPOST ]] || die "$WAYPOST is missing"; fi

mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$RESULTS/work
mkdir -p "$WORK"
RUNS=$RESULTS/runs.csv
echo "services,server,round,duration_s,sent,completed,lost,qps,avg_latency_s,cpu_s,rss_kb,pss_kb,rcodes" >"$RUNS"

# --- sanity: every server gives the same rcode and answer section -----------------------------------
# Normalised: "STATUS" then the answer RRs lower-cased and sorted (TTL kept: all must serve 5).
answer_of() { # port name type
    dig @127.0.0.1 -p "$1" +norec +tries=2 +time=2 +noall +comments +answer "$2" "$3" | awk '
        /->>HEADER<<-/ { for (i = 1; i <= NF; i++) if ($i == "status:") { s = $(i + 1); sub(/,$/, "", s); print "status " s } }
        !/^;/ && NF >= 5 { $1 = tolower($1); line = $1; for (i = 2; i <= NF; i++) line = line " " tolower($i); print line }' | sort
}

# A few names of each kind, picked from the zone file and the query file.
sanity_names() { # data dir
    awk -F'\t' -v zone="$ZONE" '
        /^[;$]/ { next }
        { n = $1; cnt[n, $4]++; if (!(n in seen)) { seen[n] = 1; order[++N] = n } if ($4 == "CNAME") cname[n] = $5 }
        END {
            for (i = 1; i <= N; i++) { n = order[i]
                if (cnt[n, "AAAA"] && dual < 2) { print n, "A"; print n, "AAAA"; dual++ }
                else if (cnt[n, "A"] == 1 && n ~ /^svc-/ && v4 < 2) { print n, "A"; print n, "AAAA"; v4++ }
                else if (cnt[n, "A"] > 1 && headless < 2) { print n, "A"; headless++ }
                else if (cnt[n, "SRV"] == 1 && srv1 < 2) { print n, "SRV"; srv1++ }
                else if (cnt[n, "SRV"] > 1 && srvn < 2) { print n, "SRV"; srvn++ }
                else if (cnt[n, "A"] == 1 && n ~ /^[a-z0-9-]+\.svc-[0-9]+\./ && ep < 2) { print n, "A"; ep++ }
                # ExternalName pointing inside the cluster (outside names would need recursion).
                else if (cnt[n, "CNAME"] && cname[n] ~ ("\\.svc\\." zone "\\.$") && cn < 1) { print n, "A", "cname"; cn++ }
            }
        }' "$1/$ZONE.zone"
    awk -v zone="$ZONE" 'index($1, zone "." zone) || index($1, zone ".svc." zone) { print; if (++n == 3) exit }' "$1/queries.txt"
    echo "nosuchservice.ns-0.svc.$ZONE A"
    echo "dns-version.$ZONE TXT"
}

sanity_check() { # data dir, servers...
    local data=$1; shift
    local ref=$1 bad=0 name type kind s want want_s got
    while read -r name type kind; do
        want=$(answer_of "$(port_of "$ref")" "$name" "$type")
        [[ -n $want ]] || die "no answer from reference $ref for $name $type"
        for s in "$@"; do
            [[ $s == "$ref" ]] && continue
            got=$(answer_of "$(port_of "$s")" "$name" "$type")
            want_s=$want
            # unbound's local-data returns an in-zone CNAME without chasing it (the stub follows
            # it with a second query); ExternalName names are not in the query mix.
            if [[ $kind == cname && $s == unbound && $UNBOUND_MODE == local ]]; then
                want_s=$(grep -E '^status | cname ' <<<"$want")
            fi
            if [[ $got != "$want_s" ]]; then
                bad=1
                echo "dns-bench: MISMATCH $name $type: $ref vs $s" >&2
                diff <(echo "$want_s") <(echo "$got") | sed 's/^/    /' >&2 || true
            fi
        done
    done < <(sanity_names "$data")
    (( bad == 0 )) || die "servers answer differently (see MISMATCH above); not benchmarking"
    log "sanity: $* answer alike for $(sanity_names "$data" | wc -l) names (reference $ref)"
}

# --- measuring ---------------------------------------------------------------------------------
# One dnsperf run at saturation on core 1; appends a line to runs.csv.
measure() { # size server round queries [label]
    local size=$1 s=$2 round=$3 queries=$4 label=${5:-$2} port pid out c0 c1 t0 t1
    port=$(port_of "$s"); pid=${PID[$s]}
    out=$WORK/dnsperf-$size-$label-$round.txt
    c0=$(cpu_seconds "$pid"); t0=$(date +%s.%N)
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$port" -d "$queries" -l "$DURATION" -c "$CLIENTS" \
        -q "$OUTSTANDING" -t 1 >"$out" 2>&1 || { cat "$out" >&2; die "dnsperf against $s failed"; }
    c1=$(cpu_seconds "$pid"); t1=$(date +%s.%N)
    kill -0 "$pid" 2>/dev/null || die "$s died during the run (log: $WORK/$s/log)"
    local rss pss
    rss=$(mem_kb "$pid" VmRSS); pss=$(mem_kb "$pid" Pss)
    awk -v size="$size" -v s="$label" -v round="$round" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" \
        -v rss="$rss" -v pss="$pss" '
        /Queries sent:/ { sent = $3 }
        /Queries completed:/ { done = $3 }
        /Queries lost:/ { lost = $3 }
        /Queries per second:/ { qps = $4 }
        /Average Latency \(s\):/ { lat = $4 }
        /Response codes:/ { sub(/.*Response codes: */, ""); n = split($0, parts, ", ");
            for (i = 1; i <= n; i++) { split(parts[i], f, " "); rc = rc (rc == "" ? "" : ";") f[1] "=" f[2] } }
        END {
            if (qps == "") exit 1
            printf "%s,%s,%s,%.3f,%s,%s,%s,%s,%s,%.3f,%s,%s,%s\n", size, s, round, t1 - t0, sent, done, lost, qps, lat, c1 - c0, rss, pss, rc
        }' "$out" >>"$RUNS" || { cat "$out" >&2; die "could not parse dnsperf output $out"; }
    tail -1 "$RUNS" | awk -F, '{ printf "dns-bench:   %-14s %6s svc round %s: %9.0f qps, server CPU %5.2f s (%.0f%%), %8.0f q/CPU-s, lost %s, RSS %d MiB\n", $2, $1, $3, $8, $10, 100 * $10 / $4, $6 / ($10 > 0 ? $10 : 1e-9), $7, $11 / 1024 }' >&2
}

# Per-query latencies at a fixed, unsaturated rate (dnsperf -v), for the latency CDF and p99.
measure_latency() { # size server queries [label]
    (( LAT_DURATION > 0 )) || return 0
    local port label=${4:-$2}; port=$(port_of "$2")
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$port" -d "$3" -l "$LAT_DURATION" -Q "$LAT_QPS" -c "$CLIENTS" \
        -q "$OUTSTANDING" -t 1 -v >"$RESULTS/lat-$1-$label.txt" 2>&1 || die "latency run against $2 failed"
}

# --- main loop ----------------------------------------------------------------------------------
read -r -a servers <<<"$SERVERS"
FAILED=()
ref=${servers[0]}
has_server knot && ref=knot
started=$SECONDS
for size in $SIZES; do
    data=$WORK/data-$size
    log "=== $size services: generating into $data"
    "$GEN" --services "$size" --seed "$SEED" --zone "$ZONE" --out "$data"
    up=()
    for s in "${servers[@]}"; do
        if start_server "$s" "$data"; then up+=("$s"); else FAILED+=("$s@$size: did not start"); fi
    done
    (( ${#up[@]} > 0 )) || die "no server started at $size services"
    # Reference first so its answers are what the others are compared with.
    r=$ref; [[ " ${up[*]} " == *" $ref "* ]] || r=${up[0]}
    sanity_check "$data" "$r" $(for s in "${up[@]}"; do [[ $s == "$r" ]] || echo "$s"; done)
    for s in "${up[@]}"; do # warm-up, not recorded
        taskset -c 1 dnsperf -s 127.0.0.1 -p "$(port_of "$s")" -d "$data/queries.txt" -l 1 -c "$CLIENTS" \
            -q "$OUTSTANDING" -t 1 >/dev/null 2>&1 || true
    done
    for round in $(seq "$ROUNDS"); do
        # Rotate the order each round so no server always runs first.
        n=${#up[@]}
        for i in $(seq 0 $((n - 1))); do
            s=${up[$(((i + round - 1) % n))]}
            measure "$size" "$s" "$round" "$data/queries.txt"
        done
    done
    for s in "${up[@]}"; do measure_latency "$size" "$s" "$data/queries.txt"; done
    for s in "${up[@]}"; do stop_server "$s"; done
    [[ ${KEEP_DATA:-0} == 1 ]] || rm -rf "$data" # 50k services make a ~160 MB state.yaml
done

# --- churn: waypost while the cluster changes CHURN_RATE times a second ---------------------------
# The changes go through the real watch path: waypost-testapi (tests/apiserver) serves the
# generated cluster and flips one EndpointSlice endpoint's readiness CHURN_RATE times a second;
# waypost follows it with --kubeconfig. The API server shares core 1 with dnsperf.
if has_server waypost && (( CHURN_SIZE > 0 )); then
    data=$WORK/churn-$CHURN_SIZE
    log "=== churn: $CHURN_SIZE services, $CHURN_RATE changes/s through the test API server"
    "$GEN" --services "$CHURN_SIZE" --seed "$SEED" --zone "$ZONE" --out "$data"
    taskset -c 1 "$TARGET/release/waypost-testapi" --listen 127.0.0.1:0 --preload "$data/state.yaml" \
        --kubeconfig "$data/kubeconfig" --churn-per-sec "$CHURN_RATE" --history-limit 100000 >"$data/api.url" 2>"$RESULTS/testapi.log" &
    api_pid=$!
    until [[ -s $data/api.url ]]; do kill -0 "$api_pid" 2>/dev/null || die "waypost-testapi exited: $(cat "$RESULTS/testapi.log")"; sleep 0.2; done
    WAYPOST_KUBECONFIG=$data/kubeconfig start_server waypost "$data" || die "waypost did not start for the churn run"
    metric() { curl -s 127.0.0.1:9153/metrics | awk -v m="$1" '$1 == m { print $2 }'; }
    applied0=$(metric waypost_programming_latency_seconds_count)
    measure "$CHURN_SIZE" waypost 1 "$data/queries.txt" waypost-churn
    measure_latency "$CHURN_SIZE" waypost "$data/queries.txt" waypost-churn
    applied1=$(metric waypost_programming_latency_seconds_count)
    sum=$(metric waypost_programming_latency_seconds_sum)
    count=$(metric waypost_programming_latency_seconds_count)
    {
        echo "waypost published $(awk -v a="$applied0" -v b="$applied1" 'BEGIN { print b - a }') index updates from the watch during the measured runs"
        echo "(mean watch-to-answer latency over the whole run: $(awk -v s="$sum" -v c="$count" 'BEGIN { if (c > 0) printf "%.2f ms", 1000 * s / c; else print "n/a" }'))"
    } >"$RESULTS/churn.txt"
    grep -iE 'error|warn' "$WORK/waypost/log" | tail -3 >&2 || true
    log "$(tr '\n' ' ' <"$RESULTS/churn.txt")"
    stop_server waypost
    kill "$api_pid" 2>/dev/null; wait "$api_pid" 2>/dev/null || true
fi

# --- report ----------------------------------------------------------------------------------------
log "measured in $((SECONDS - started)) s; results in $RESULTS"
{
    echo "# DNS benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Servers pinned to core 0, dnsperf on core 1 (-c $CLIENTS -q $OUTSTANDING, ${DURATION}s runs, median of $ROUNDS rounds)."
    echo "Latency percentiles from a separate ${LAT_DURATION}s run at a fixed $LAT_QPS qps (dnsperf -v per-query times);"
    echo "'avg lat (sat.)' is dnsperf's mean at saturation. unbound mode: $UNBOUND_MODE. $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo
    "$GEN" report --results "$RESULTS"
    if [[ -f $RESULTS/churn.txt ]]; then
        echo
        echo "Churn ($CHURN_SIZE services, waypost-churn rows): $(tr '\n' ' ' <"$RESULTS/churn.txt")"
    fi
} | tee "$RESULTS/report.md"
"$GEN" plot --results "$RESULTS"
ls "$RESULTS"/*.svg >&2
if (( ${#FAILED[@]} > 0 )); then
    printf '%s\n' "${FAILED[@]}" | sed 's/^/dns-bench: FAILED: /' >&2
    die "some servers could not be measured (above); the table lacks them"
fi
