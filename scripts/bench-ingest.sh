#!/usr/bin/env bash
# Ingest rate of small attachments through a real mount, with 0, 10,000 and 50,000
# attachments already in the store, for the base commit and the working tree in the same
# run (issue 30 item 3: the manifest was rewritten whole on every ingest).
#
#   scripts/bench-ingest.sh [BASE_REV]        (default 8cf38a7; root and /dev/fuse needed)
#
# BENCH_SECONDS (default 6) bounds each measurement; BENCH_MAX (default 1500) the ingests
# in it. BENCH_SIZES overrides "0 10000 50000". The store is pre-populated directly on disk
# (blobs, sidecars and a manifest with a row each), not through the mount.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-8cf38a7}
SECONDS_EACH=${BENCH_SECONDS:-6}
MAX=${BENCH_MAX:-1500}
SIZES=${BENCH_SIZES:-"0 10000 50000"}
WORK=$(mktemp -d /tmp/bench-ingest.XXXXXX)
trap 'for m in "$WORK"/mnt-*; do [ -d "$m" ] && { "$WORK/new" unmount "$m" 2>/dev/null || fusermount3 -u "$m" 2>/dev/null || true; }; done; rm -rf "$WORK"' EXIT

# The base commit's binary: its sources in a temp dir, built in this target dir (the
# dependencies are shared; only agentmount and the vendored fuser are compiled again).
# Each build's own executable (in target/release/deps, named by its hash) is copied, not
# target/release/agentmount, which only the last compilation updates.
exe() {
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "agentmount":
        print(m["executable"])'
}
git archive "$BASE" | tar -x -C "$WORK" --one-top-level=base-src
cp "$(cargo build --release --message-format=json --manifest-path "$WORK/base-src/Cargo.toml" --target-dir target | exe)" "$WORK/base"
cp "$(cargo build --release --message-format=json | exe)" "$WORK/new"

populate() { # DIR N
    python3 - "$1" "$2" <<'EOF'
import hashlib, json, os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
att = os.path.join(root, "attachments")
os.makedirs(os.path.join(att, "sha256"), exist_ok=True)
old = int(time.time() * 1000) - 7_200_000
rows = []
made = set()
for i in range(n):
    data = f"existing attachment {i}\n".encode()
    h = hashlib.sha256(data).hexdigest()
    d = os.path.join(att, "sha256", h[:2])
    if h[:2] not in made:
        os.makedirs(d, exist_ok=True)
        made.add(h[:2])
    with open(os.path.join(d, h), "wb") as f:
        f.write(data)
    meta = {"id": h, "media_type": {"kind": "file", "type": "text/plain"}, "byte_len": len(data), "label": f"e{i}.txt"}
    with open(os.path.join(d, h + ".json"), "w") as f:
        json.dump(meta, f, indent=2)
    rows.append({"attachment_id": h, "session_id": None, "canonical_uri": "sha256:" + h,
                 "intent_at_epoch_ms": old, "committed_at_epoch_ms": old + 1})
with open(os.path.join(att, "manifest.json"), "w") as f:
    json.dump({"intents": rows}, f, indent=2)
    f.write("\n")
EOF
}

ingest() { # MOUNTPOINT TAG -> prints "count seconds manifest_ms store_ms"
    # Every 10th ingest, .status is read (off the clock) for where the daemon's time went:
    # the manifest phase and the whole store-side ingest (lock to sidecar), medians.
    python3 - "$1" "$2" "$SECONDS_EACH" "$MAX" <<'EOF'
import json, os, statistics, sys, time
mnt, tag, limit, most = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
n, spent, man, tot = 0, 0.0, [], []
t0 = time.monotonic()
while n < most and time.monotonic() - t0 - spent < limit:
    with open(os.path.join(mnt, "attachments", f"{tag}-{n}.txt"), "wb") as f:
        f.write(f"new attachment {tag} {n} {time.time_ns()}\n".encode())
    n += 1
    if n % 10 == 0:
        t = time.monotonic()
        p = json.load(open(os.path.join(mnt, ".status"))).get("last_ingest") or {}
        man.append(p.get("manifest_ms", 0.0))
        tot.append(p.get("total_ms", 0.0))
        spent += time.monotonic() - t
med = lambda v: statistics.median(v) if v else 0.0
print(n, time.monotonic() - t0 - spent, f"{med(man):.2f}", f"{med(tot):.2f}")
EOF
}

declare -A RATE MAN
for n in $SIZES; do
    populate "$WORK/seed-$n" "$n"
    for v in base new; do
        s="$WORK/store-$v-$n"
        m="$WORK/mnt-$v-$n"
        cp -a "$WORK/seed-$n" "$s"
        mkdir -p "$m"
        "$WORK/$v" mount --store "$s" "$m"
        ls "$m/attachments" >/dev/null # the index is built before the clock starts
        read -r count secs man_ms store_ms < <(ingest "$m" "$v")
        sleep 1.5 # outside the clock: lets the journal's idle fold run before unmount
        "$WORK/$v" unmount "$m"
        RATE[$v-$n]=$(python3 -c "print(f'{$count / $secs:.1f}')")
        journal=$([ -e "$s/attachments/manifest.journal" ] && stat -c %s "$s/attachments/manifest.journal" || echo -)
        rows=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['intents']))" "$s/attachments/manifest.json")
        MAN[$v-$n]=$man_ms
        printf '%-4s existing=%-6s ingests=%-5s in %5.2f s %7s/s  median ms: manifest %6s, store-side ingest %6s; after unmount: manifest rows %s, journal bytes %s\n' \
            "$v" "$n" "$count" "$secs" "${RATE[$v-$n]}" "$man_ms" "$store_ms" "$rows" "$journal"
        rm -rf "$s"
    done
    rm -rf "$WORK/seed-$n"
done

echo
echo "| existing attachments | $BASE ingests/s | this tree ingests/s | this tree / $BASE | manifest ms/ingest, $BASE | this tree |"
echo "|---:|---:|---:|---:|---:|---:|"
for n in $SIZES; do
    python3 -c "import sys; b,w=float(sys.argv[2]),float(sys.argv[3]); print(f'| {int(sys.argv[1]):,} | {b:.1f} | {w:.1f} | {w/b:.2f}x | {sys.argv[4]} | {sys.argv[5]} |')" "$n" "${RATE[base-$n]}" "${RATE[new-$n]}" "${MAN[base-$n]}" "${MAN[new-$n]}"
done
first=${SIZES%% *}
last=${SIZES##* }
python3 -c "import sys; b0,b1,w0,w1=map(float,sys.argv[1:5]); print(f'\nratio {sys.argv[6]}/{sys.argv[5]} existing: base {b1/b0:.3f}, this tree {w1/w0:.3f} (1.0 = independent of the number of attachments)')" \
    "${RATE[base-$first]}" "${RATE[base-$last]}" "${RATE[new-$first]}" "${RATE[new-$last]}" "$first" "$last"
python3 -c "import sys; b0,b1,w0,w1=map(float,sys.argv[1:5]); print(f'manifest ms per ingest, {sys.argv[6]}/{sys.argv[5]} existing: base {b1/max(b0,1e-9):.2f}, this tree {w1/max(w0,1e-9):.2f}')" \
    "${MAN[base-$first]}" "${MAN[base-$last]}" "${MAN[new-$first]}" "${MAN[new-$last]}" "$first" "$last"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
