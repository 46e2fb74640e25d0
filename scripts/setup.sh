#!/usr/bin/env bash
# Installs what agentmount's build, tests and demo need (fuse3, the tools the tests drive,
# sqlite3, and PostgreSQL for the shared-store backend's tests). Idempotent: installs only what is
# missing (apt-get, as root) and the rustfmt/clippy components.
set -euo pipefail
need=()
for pair in fusermount3:fuse3 jq:jq vim:vim rsync:rsync getfattr:attr perl:perl python3:python3 sha256sum:coreutils sqlite3:sqlite3 strace:strace openssl:openssl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
# The Postgres backend's tests start a real server (initdb/pg_ctl as the postgres user,
# on a Unix socket in a temp dir): Debian's postgresql package, whose programs live
# under /usr/lib/postgresql/<version>/bin; psql comes with it.
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
  need+=(postgresql)
fi
if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run as root (sudo) so apt-get can install them" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || { echo "setup: /dev/fuse is missing and 'modprobe fuse' failed" >&2; exit 1; }
fi
# Distributions make /dev/fuse 0666 (udev) so ordinary users can mount through
# fusermount3, which opens it as the calling user; bare VMs and containers often leave 0600.
if [ "$(id -u)" -eq 0 ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  echo "setup: chmod 0666 /dev/fuse (as distributions do) so non-root users can mount"
  chmod 0666 /dev/fuse
fi
for comp in rustfmt clippy; do
  cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$comp"
done
