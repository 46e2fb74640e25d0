#!/usr/bin/env bash
# Builds agentmount and mounts the default store at MOUNTPOINT (default /tmp/agents).
# If the default store holds nothing yet, it is filled with the demo data first.
set -euo pipefail
cd "$(dirname "$0")/.."
mp=${1:-/tmp/agents}
bash scripts/setup.sh
cargo build --release --quiet
bin=$PWD/target/release/agentmount
store=${AGENTMOUNT_STORE:-${XDG_DATA_HOME:-$HOME/.local/share}/agentmount}
if [ ! -e "$store/session-manager/sessions.json" ] && [ ! -e "$store/sm/goals.json" ]; then
  echo "demo: the default store $store is empty; filling it with the demo data"
  mkdir -p "$store"
  cp -r tests/fixtures/store/. "$store/"
  chmod -R u+w "$store"
fi
if grep -qs " $mp " /proc/self/mountinfo; then "$bin" unmount "$mp"; fi
mkdir -p "$mp"
"$bin" mount "$mp"
echo "\$ ls -l $mp $mp/sessions $mp/attachments"
ls -l "$mp" "$mp/sessions" "$mp/attachments"
echo "\$ jq -r '.task + \" — \" + .state' $mp/sessions/*.json"
jq -r '.task + " — " + .state' "$mp"/sessions/*.json
echo
echo "Mounted $store at $mp. Try: cat $mp/goals/*.json | jq .progress; echo dry-run > $mp/.gc; cat $mp/.gc"
echo "Unmount with: $bin unmount $mp"
