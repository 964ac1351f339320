# shellcheck shell=bash disable=SC2034 # the variables are for the scripts that source this
# Shared by up.sh and down.sh (sourced, not run): the state directory and the identity of the
# processes they start.
#
# A process is named in "$BGW_LOCAL_DIR/pids" by a line `name pid start`, where `start` is its
# start time (field 22 of /proc/PID/stat). down.sh signals a pid only while that start time
# still matches, so a pid that the system reused for someone else's process is never touched.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="${repo}/deploy/local"
target="${CARGO_TARGET_DIR:-${repo}/target}"
dir="${BGW_LOCAL_DIR:-${target}/local-cluster}"
pids_file="${dir}/pids"

# The start time of PID, or nothing when there is no such process.
start_time() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    # The command name (field 2) may hold spaces and parentheses: count after the last `)`.
    stat=${stat##*) }
    # shellcheck disable=SC2086 # split on purpose
    set -- ${stat}
    printf '%s\n' "${20}"
}

# Whether PID is the process that started at START and has not exited. An exited process that
# nobody reaped (a zombie) has exited.
alive() {
    local pid=$1 start=$2 stat
    stat=$(cat "/proc/${pid}/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]] || return 1
    [[ $(start_time "${pid}") == "${start}" ]]
}

# The pids of the live children of PID (nginx's workers).
children() {
    local stat parent
    for stat in /proc/[0-9]*/stat; do
        parent=$(cat "${stat}" 2>/dev/null) || continue
        parent=${parent##*) }
        parent=${parent#* }
        if [[ ${parent%% *} == "$1" ]]; then
            stat=${stat#/proc/}
            printf '%s\n' "${stat%/stat}"
        fi
    done
}
