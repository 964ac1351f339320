#!/usr/bin/env bash
# Stops the local cluster of deploy/local/up.sh: exactly the processes it recorded in its state
# directory (BGW_LOCAL_DIR, default target/local-cluster), each by its pid, and only while that
# pid is still the process up.sh started. Logs stay in the state directory.
#
# nginx first (SIGTERM: a fast stop that closes its clients' sockets), with the gateway nodes
# (SIGTERM: they drain, after their drain delay of 2 s, and exit); Redis last, so that the
# nodes save their sessions on the way out. Whatever outlives BGW_LOCAL_STOP_TIMEOUT seconds
# (default 40: above the nodes' drain delay + drain timeout) gets SIGKILL.
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

timeout=${BGW_LOCAL_STOP_TIMEOUT:-40}

if [[ ! -f ${pids_file} ]]; then
    echo "deploy/local/down.sh: nothing to stop (no ${pids_file})"
    exit 0
fi

front=()  # "name pid start" of nginx and the nodes
back=()   # the same of Redis
while read -r name pid start; do
    [[ -n ${name} ]] || continue
    if [[ ${name} == redis ]]; then
        back+=("${name} ${pid} ${start}")
    else
        front+=("${name} ${pid} ${start}")
    fi
done <"${pids_file}"

# Signals every live process of the list, waits for all to exit, then kills what is left.
stop() {
    local entry name pid start child waiting deadline
    local -a live=()
    for entry in "$@"; do
        read -r name pid start <<<"${entry}"
        alive "${pid}" "${start}" || continue
        live+=("${entry}")
        # nginx's workers, which exit with their master (or are killed with it, below).
        for child in $(children "${pid}"); do
            live+=("${name}-worker ${child} $(start_time "${child}")")
        done
        kill -TERM "${pid}" 2>/dev/null || true
        echo "stopping ${name} (pid ${pid})"
    done
    deadline=$((SECONDS + timeout))
    while :; do
        waiting=()
        for entry in "${live[@]}"; do
            read -r name pid start <<<"${entry}"
            if alive "${pid}" "${start}"; then
                waiting+=("${entry}")
            fi
        done
        ((${#waiting[@]} > 0)) || return 0
        if ((SECONDS >= deadline)); then
            for entry in "${waiting[@]}"; do
                read -r name pid start <<<"${entry}"
                echo "${name} (pid ${pid}) still runs after ${timeout}s: SIGKILL" >&2
                kill -KILL "${pid}" 2>/dev/null || true
            done
            return 0
        fi
        sleep 0.1
    done
}

((${#front[@]} == 0)) || stop "${front[@]}"
((${#back[@]} == 0)) || stop "${back[@]}"
rm -f "${pids_file}" "${dir}/cluster.env"
echo "local cluster stopped (logs: ${dir}/logs)"
