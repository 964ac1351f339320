#!/usr/bin/env bash
# The project's tests: formatting, lints, then every unit and integration test of the workspace.
#
# Runs on a fresh Debian or Ubuntu machine with the Rust toolchain (rustup) present, from any
# directory. What the tests need and the machine lacks is installed first: redis-server and nginx
# (the end-to-end tests start their own on loopback ports) with apt, rustfmt and clippy with
# rustup. Installing packages needs root, or sudo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*" >&2
}

as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "deploy/test.sh: need root (or sudo) to run: $*" >&2
        exit 1
    fi
}

missing=()
for tool in redis-server nginx; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
        missing+=("${tool}")
    fi
done
if ((${#missing[@]} > 0)); then
    step "installing ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi

components=()
cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
if ((${#components[@]} > 0)); then
    step "installing ${components[*]}"
    rustup component add "${components[@]}"
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace
