#!/usr/bin/env bash
# The gateway's fan-out against the floor of the machine at hand, in one run, as one table.
#
# The floor is `loadtest floor`: one write(2) per socket per message of the very frame the
# gateway writes per delivery, and nothing else. Machines (and one machine from day to day)
# differ by 2x, so the figures that count are the ratios to the floor measured in the same run.
#
# Runs, one after another, each on processes of its own started here on free loopback ports:
#   for 2,000 subscribers x 20 msg/s and 10,000 subscribers x 5 msg/s (10 s, 100-byte payloads):
#     the floor; a gateway on the embedded broker; Redis with 2 gateways (subscribers spread
#     over both, publishes through both); the floor again (the ratios are to the mean of the
#     two floors, and the two show how far the machine drifted meanwhile)
#   10,000 subscribers x 150 msg/s on the embedded broker: deliveries/s held in overload
#   memory per idle connection: 18,000 connections to a fresh node, without and with a
#     subscription (all to one channel)
# then prints the table (Markdown), the CPU of each server process, and the memory figures.
# Segments per delivery are the TCP data segments the subscribers (the floor's reader) received
# per message: one per write(2) on loopback, so below 1 where the server put several messages
# in one write, which makes its CPU per delivery lower too (as in overload).
#
# Usage: loadtest/bench.sh [--gateway PATH] [--loadtest PATH] [--quick]
#   --gateway, --loadtest  the binaries (default target/release/gateway and
#                          target/release/loadtest: `cargo build --release -p gateway -p loadtest`)
#   --quick                small numbers and 2 s runs, to try the script itself
#
# Needs redis-server and redis-cli (Debian: apt-get install redis-server), 20,000 open files
# per process, and source addresses 127.0.0.1 and 127.0.0.2 (any Linux). It builds nothing, and
# stops everything it started, by pid, when it ends, fails or is interrupted.
set -euo pipefail

die() {
    printf 'loadtest/bench.sh: %s\n' "$*" >&2
    exit 1
}

say() {
    printf 'bench: %s\n' "$*" >&2
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gateway=${repo}/target/release/gateway
loadtest=${repo}/target/release/loadtest
seconds=10
small=2000
small_rate=20
large=10000
large_rate=5
overload_rate=150
idle=18000
payload=100
while (($# > 0)); do
    case $1 in
    --gateway)
        gateway=${2:?--gateway needs a path}
        shift 2
        ;;
    --loadtest)
        loadtest=${2:?--loadtest needs a path}
        shift 2
        ;;
    --quick)
        seconds=2 small=200 large=500 idle=1000
        shift
        ;;
    *) die "unknown argument: $1 (usage: loadtest/bench.sh [--gateway PATH] [--loadtest PATH] [--quick])" ;;
    esac
done
for binary in "${gateway}" "${loadtest}"; do
    [[ -x ${binary} ]] || die "no ${binary}; build it: cargo build --release -p gateway -p loadtest"
done
for program in redis-server redis-cli; do
    command -v "${program}" >/dev/null 2>&1 || die "${program} not found (apt-get install redis-server)"
done

# No scenario may hang the script: each gets this long at most.
run_limit=300s
work=$(mktemp -d)
started_pids=()

# Stops what this script started (SIGTERM, then SIGKILL after 5 s), by pid.
stop_started() {
    local pid tries
    for pid in "${started_pids[@]}"; do
        kill -TERM "${pid}" 2>/dev/null || true
    done
    for pid in "${started_pids[@]}"; do
        for ((tries = 0; tries < 50; tries++)); do
            kill -0 "${pid}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${pid}" 2>/dev/null; then
            kill -KILL "${pid}" 2>/dev/null || true
        fi
        wait "${pid}" 2>/dev/null || true
    done
    started_pids=()
}

cleanup() {
    stop_started
    rm -rf "${work}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a gateway node on free loopback ports (the node picks them and logs them), with the
# given flags; sets node_pid, node_url and node_admin.
nodes_started=0
start_node() {
    local log tries line
    nodes_started=$((nodes_started + 1))
    log="${work}/node-${nodes_started}.log"
    : >"${log}"
    "${gateway}" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --max-connections 30000 \
        --drain-delay 0s --drain-window 0s --drain-timeout 1s "$@" >"${log}" 2>&1 &
    node_pid=$!
    started_pids+=("${node_pid}")
    for ((tries = 0; tries < 100; tries++)); do
        line=$(grep -m1 ' listening ' "${log}" || true)
        if [[ ${line} =~ client=([0-9.:]+).*admin=([0-9.:]+) ]]; then
            node_url="ws://${BASH_REMATCH[1]}/ws"
            node_admin="http://${BASH_REMATCH[2]}"
            return
        fi
        kill -0 "${node_pid}" 2>/dev/null || break
        sleep 0.1
    done
    cat "${log}" >&2
    die "the gateway did not start"
}

# Starts redis-server without persistence on a free loopback port; sets redis_pid, redis_url.
start_redis() {
    local attempt tries port
    for ((attempt = 0; attempt < 20; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        redis-server --port "${port}" --bind 127.0.0.1 --save "" --appendonly no \
            --dir "${work}" --loglevel warning >"${work}/redis.log" 2>&1 &
        redis_pid=$!
        started_pids+=("${redis_pid}")
        for ((tries = 0; tries < 50; tries++)); do
            # Ours, not another Redis that had the port already.
            if redis-cli -p "${port}" info server 2>/dev/null |
                grep -q "^process_id:${redis_pid}"; then
                redis_url="redis://127.0.0.1:${port}"
                return
            fi
            kill -0 "${redis_pid}" 2>/dev/null || break
            sleep 0.1
        done
        stop_started
    done
    die "redis-server did not start"
}

# loadtest SCENARIO ARGS..., its figures (one JSON object) in the file named first.
measure() {
    local out=$1
    shift
    say "loadtest $*"
    timeout --foreground "${run_limit}" "${loadtest}" "$@" --json >"${out}" ||
        die "loadtest $1 failed or ran out of time"
}

# The number named $1 in the one-line JSON object of file $2.
field() {
    sed -n "s/.*\"$1\":\(-\{0,1\}[0-9][0-9.eE+-]*\).*/\1/p" "$2"
}

# $1 with thousands separators and $2 decimals.
num() {
    awk -v x="$1" -v d="${2:-0}" 'BEGIN {
        s = sprintf("%." d "f", x); n = split(s, part, ".")
        i = part[1]; out = ""
        while (length(i) > 3) { out = "," substr(i, length(i) - 2) out; i = substr(i, 1, length(i) - 3) }
        printf "%s%s%s", i, out, (n > 1 ? "." part[2] : "")
    }'
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'
}

sources=127.0.0.1,127.0.0.2
rows=()
notes=()

# The floor's CPU per write: the mean of the runs before and after a load's fan-outs.
floor_us() {
    awk -v a="$(field cpu_us_per_write "$1")" -v b="$(field cpu_us_per_write "$2")" \
        'BEGIN { printf "%.4f", (a + b) / 2 }'
}

# A floor row: the files of the runs before and after, the label.
floor_row() {
    local before=$1 after=$2
    rows+=("| $3 | $(field frame_bytes "${before}") B \
| $(num "$(field writes_per_second "${before}")") / $(num "$(field writes_per_second "${after}")") \
| $(num "$(field cpu_us_per_write "${before}")" 2) / $(num "$(field cpu_us_per_write "${after}")" 2) \
| 1.00 | $(num "$(field segments_per_write "${before}")" 2) / $(num "$(field segments_per_write "${after}")" 2) | | | EAGAIN $(($(field eagain "${before}") + $(field eagain "${after}"))), \
$(($(field short_sockets "${before}") + $(field short_sockets "${after}"))) sockets short |")
}

# A fan-out row: its file, its label, the floor's CPU per write, then PID=NAME of each server.
fanout_row() {
    local file=$1 label=$2 floor=$3 cpu="" server
    shift 3
    rows+=("| ${label} | $(field frame_bytes "${file}") B \
| $(num "$(field deliveries_per_second "${file}")") \
| $(num "$(field server_us_per_delivery "${file}")" 2) \
| $(ratio "$(field server_us_per_delivery "${file}")" "${floor}") \
| $(num "$(field segments_per_delivery "${file}")" 2) \
| $(num "$(field latency_p50_ms "${file}")" 1) ms | $(num "$(field latency_p99_ms "${file}")" 1) ms \
| $(field lost "${file}") / $(field repeated "${file}") / $(field out_of_order "${file}") |")
    for server in "$@"; do
        cpu+="${cpu:+, }${server#*=} $(num "$(field "${server%%=*}" "${file}")" 2) s"
    done
    notes+=("${label}: ${cpu} over $(num "$(field server_deliveries "${file}")") deliveries \
($(field publish_errors "${file}") publish errors)")
}

# One load: the floor, one node on the embedded broker, 2 nodes on Redis, the floor again (a
# machine shared with other work drifts; the two floors show by how much). Sets floor to the
# floor's mean CPU per write.
load() {
    local n=$1 rate=$2 tag="$1x$2" label
    label="$(num "${n}") x ${rate}/s"

    measure "${work}/floor-${tag}-before.json" floor -n "${n}" -r "${rate}" -t "${seconds}s" \
        -p "${payload}"

    start_node
    measure "${work}/embedded-${tag}.json" fanout --url "${node_url}" --admin "${node_admin}" \
        --sources "${sources}" -s "${n}" -r "${rate}" -t "${seconds}s" -p "${payload}" \
        --server-pid "${node_pid}"
    stop_started
    local embedded_pid=${node_pid}

    start_redis
    local pids="${redis_pid}" urls="" admins="" names=("${redis_pid}=Redis") i
    for i in 1 2; do
        start_node --redis-url "${redis_url}"
        pids+=",${node_pid}" urls+="${urls:+,}${node_url}" admins+="${admins:+,}${node_admin}"
        names+=("${node_pid}=node ${i}")
    done
    measure "${work}/redis-${tag}.json" fanout --url "${urls}" --admin "${admins}" \
        --sources "${sources}" -s "${n}" -r "${rate}" -t "${seconds}s" -p "${payload}" \
        --server-pid "${pids}"
    stop_started

    measure "${work}/floor-${tag}-after.json" floor -n "${n}" -r "${rate}" -t "${seconds}s" \
        -p "${payload}"
    floor=$(floor_us "${work}/floor-${tag}-before.json" "${work}/floor-${tag}-after.json")
    floor_row "${work}/floor-${tag}-before.json" "${work}/floor-${tag}-after.json" \
        "${label}: floor (write(2) only), before / after"
    fanout_row "${work}/embedded-${tag}.json" "${label}: 1 node, embedded broker" "${floor}" \
        "${embedded_pid}=node"
    fanout_row "${work}/redis-${tag}.json" "${label}: 2 nodes + Redis" "${floor}" "${names[@]}"
}

load "${small}" "${small_rate}"
load "${large}" "${large_rate}"
# The overload is measured against the floor of the same sockets (its frames are 2 bytes longer:
# 4-digit seqs). Its subscribers fall seconds behind: a long grace lets them catch up, so that
# only what never arrives counts as lost.

start_node
overload="${work}/overload.json"
measure "${overload}" fanout --url "${node_url}" --admin "${node_admin}" --sources "${sources}" \
    -s "${large}" -r "${overload_rate}" -t "${seconds}s" -p "${payload}" --server-pid "${node_pid}" \
    --grace 60s
stop_started
fanout_row "${overload}" "$(num "${large}") x ${overload_rate}/s (overload): 1 node, embedded broker" \
    "${floor}" "${node_pid}=node"

memory=()
for subscribe in "" bench.idle; do
    start_node
    measure "${work}/idle.json" connections --url "${node_url}" --admin "${node_admin}" \
        --sources "${sources}" -n "${idle}" --hold 1s ${subscribe:+--subscribe "${subscribe}"}
    stop_started
    memory+=("$(num "$(field bytes_per_connection "${work}/idle.json")") bytes per idle connection \
$([[ -n ${subscribe} ]] && echo "subscribed to one channel" || echo "without subscription") \
($(num "$(field held_by_nodes "${work}/idle.json")") connections held, \
$(field failed "${work}/idle.json") failed)")
done

echo "| scenario | frame | deliveries/s | server µs/delivery | ratio to floor | segments/delivery | p50 | p99 | lost / repeated / reordered |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Server CPU (utime + stime, from the first publish until the last delivery arrived):"
printf -- '- %s\n' "${notes[@]}"
echo
echo "Memory (RSS growth of a fresh node over the connections it holds, embedded broker):"
printf -- '- %s\n' "${memory[@]}"
