#!/usr/bin/env bash
# Daemon memory under load a careless user can make (issue 30): resident size with 100,000
# sessions listed and read, and with 1 GiB of scratch files written. Prints a markdown
# table. Usage: scripts/bench-rss.sh [BINARY [BINARY ...]] (default: target/release/agentmount);
# give the old build too to compare them in the same run. Needs root (or /dev/fuse access).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("$@")
[ ${#bins[@]} -gt 0 ] || { cargo build --release -q; bins=(target/release/agentmount); }
N=${BENCH_RSS_SESSIONS:-100000}
SCRATCH_MIB=${BENCH_RSS_SCRATCH_MIB:-1024}
work=$(mktemp -d)
trap 'for m in "$work"/mnt*; do fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done; rm -rf "$work"' EXIT

python3 - "$work/store" "$N" <<'EOF'
import json, os, sys, uuid
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{root}/session-manager")
sessions = {}
for i in range(n):
    u = str(uuid.UUID(int=i + 1, version=4))
    sessions[u] = {"id": u, "tmux_name": f"s{i}", "cwd": "/work", "task": f"task {i}",
                   "state": "active", "created_at": "2026-01-01T00:00:00Z"}
with open(f"{root}/session-manager/sessions.json", "w") as f:
    json.dump({"sessions": sessions}, f, indent=2)
EOF

rss() { awk '/^VmRSS/ {print int($2/1024)}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print int($2/1024)}' "/proc/$1/status"; }
daemon_of() { pgrep -n -f "agentmount mount .*$1\$"; }

echo "| build | idle RSS MiB | after ls -l + reading $N sessions: RSS / peak MiB | after ${SCRATCH_MIB} MiB of scratch files: RSS / peak MiB |"
echo "|---|---|---|---|"
i=0
for bin in "${bins[@]}"; do
  i=$((i + 1))
  st="$work/store$i"; cp -a "$work/store" "$st"
  mnt="$work/mnt$i"; mkdir -p "$mnt"
  "$bin" mount --store "$st" --no-journal "$mnt"
  pid=$(daemon_of "$mnt")
  idle=$(rss "$pid")
  ls -l "$mnt/sessions" >/dev/null
  find "$mnt/sessions" -name '*.json' -print0 | xargs -0 cat >/dev/null
  r1="$(rss "$pid") / $(hwm "$pid")"
  # Scratch files: a careless user's editor backups, or `truncate`, in a record directory.
  for k in $(seq 1 $((SCRATCH_MIB / 256))); do
    dd if=/dev/zero of="$mnt/sessions/big$k.tmp" bs=1M count=256 status=none
  done
  r2="$(rss "$pid") / $(hwm "$pid")"
  rm -f "$mnt"/sessions/big*.tmp
  "$bin" unmount "$mnt" 2>/dev/null || fusermount3 -uz "$mnt"
  echo "| $bin ($(git -C "$(dirname "$bin")" rev-parse --short HEAD 2>/dev/null || echo '?')) | $idle | $r1 | $r2 |"
done
echo
echo "(load: $(cut -d' ' -f1-3 /proc/loadavg); nproc $(nproc))"
