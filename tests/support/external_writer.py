#!/usr/bin/env python3
"""An external writer of the store, as the platform writes it: reload sessions.json, change
one session, temp file + fsync + rename. With --lock it takes flock on .agentmount.lock
around the read-modify-write (the documented protocol); without, it races (trusty-mpm's
own behaviour). Prints "ack <n>" after each write that returned.

    external_writer.py STORE SESSION_ID SECONDS [--lock] [--inplace-torn]
"""
import fcntl, json, os, sys, time

store, sid, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
lock = "--lock" in sys.argv
torn = "--inplace-torn" in sys.argv
path = os.path.join(store, "session-manager", "sessions.json")
end = time.time() + secs
n = 0
while time.time() < end:
    n += 1
    lf = open(os.path.join(store, ".agentmount.lock"), "a") if lock else None
    if lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
    with open(path) as f:
        doc = json.load(f)
    rec = doc["sessions"].setdefault(sid, {"id": sid, "tmux_name": "ext", "cwd": "/", "task": "ext",
                                           "state": "active", "created_at": "2026-11-20T09:12:03Z"})
    rec["task"] = "ext %d" % n
    data = json.dumps(doc, indent=2).encode()
    if torn:
        # A careless writer: in place, in small pieces, so a reader can catch it half done.
        with open(path, "r+b") as f:
            f.truncate(0)
            for i in range(0, len(data), 512):
                f.write(data[i:i + 512]); f.flush()
    else:
        tmp = "%s.ext-%d.tmp" % (path, os.getpid())
        with open(tmp, "wb") as f:
            f.write(data); f.flush(); os.fsync(f.fileno())
        os.rename(tmp, path)
    if lf:
        fcntl.flock(lf, fcntl.LOCK_UN); lf.close()
    print("ack", n, flush=True)
