#!/usr/bin/env python3
"""Another process writing a store the way its platform does, for the conformance suite.

    conformance_writer.py files|sqlite STORE set ID MARKER
    conformance_writer.py files|sqlite STORE delete ID
    conformance_writer.py files|sqlite STORE loop ID[,ID...] ROUNDS   (prints "ack ID MARKER")
    conformance_writer.py files|sqlite STORE hold SECONDS   (takes the writer lock, prints
                                                            "locked", holds it, releases)

files: trusty-mpm's sessions.json under the documented protocol (flock on
.agentmount.lock, re-read, temp file + fsync + rename + fsync dir); the marker is the
session's "task". sqlite: arbiter's sessions table through SQLite itself (one
BEGIN IMMEDIATE transaction per write, as arbiter's pool does); the marker is
"declared_intent".
"""
import fcntl, json, os, sqlite3, sys

backend, store, cmd = sys.argv[1], sys.argv[2], sys.argv[3]


def files_write(change):
    path = os.path.join(store, "session-manager", "sessions.json")
    with open(os.path.join(store, ".agentmount.lock"), "a") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        with open(path) as f:
            doc = json.load(f)
        change(doc["sessions"])
        tmp = "%s.ext-%d.tmp" % (path, os.getpid())
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        d = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(d)
        os.close(d)


def files_set(sid, marker):
    def change(sessions):
        rec = sessions.setdefault(sid, {"id": sid, "tmux_name": "ext", "cwd": "/", "task": "",
                                        "state": "active", "created_at": "2026-11-20T09:12:03Z"})
        rec["task"] = marker
    files_write(change)


def files_delete(sid):
    files_write(lambda sessions: sessions.pop(sid))


def db():
    con = sqlite3.connect(store, isolation_level=None, timeout=10)
    con.execute("PRAGMA busy_timeout=10000")
    return con


def sqlite_set(sid, marker, con=None):
    con = con or db()
    con.execute("BEGIN IMMEDIATE")
    n = con.execute("UPDATE sessions SET declared_intent = ? WHERE session_id = ?", (marker, sid)).rowcount
    if n == 0:
        con.execute(
            "INSERT INTO sessions (session_id, agent_id, delegation_chain_snapshot, declared_intent,"
            " authorized_tools, time_limit_secs, call_budget, calls_made, rate_limit_per_minute,"
            " rate_window_start, rate_window_calls, rate_limit_window_secs, data_sensitivity_ceiling,"
            " created_at, status) VALUES (?, ?, '[]', ?, '[]', 60, 10, 0, NULL, ?, 0, 60, 'public', ?, 'active')",
            (sid, "1a000000-0000-4000-8000-000000000001", marker,
             "2026-11-20T09:10:00+00:00", "2026-11-20T09:10:00+00:00"))
    con.execute("COMMIT")


def sqlite_delete(sid):
    con = db()
    con.execute("BEGIN IMMEDIATE")
    con.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
    con.execute("COMMIT")


if cmd == "set":
    (files_set if backend == "files" else sqlite_set)(sys.argv[4], sys.argv[5])
elif cmd == "delete":
    (files_delete if backend == "files" else sqlite_delete)(sys.argv[4])
elif cmd == "loop":
    ids, rounds = sys.argv[4].split(","), int(sys.argv[5])
    con = db() if backend == "sqlite" else None
    for r in range(rounds):
        for sid in ids:
            marker = "ext-%d" % r
            if backend == "files":
                files_set(sid, marker)
            else:
                sqlite_set(sid, marker, con)
            print("ack", sid, marker, flush=True)
elif cmd == "hold":
    import time
    if backend == "files":
        lf = open(os.path.join(store, ".agentmount.lock"), "a")
        fcntl.flock(lf, fcntl.LOCK_EX)
    else:
        con = db()
        con.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[4]))
    if backend == "sqlite":
        con.execute("ROLLBACK")
else:
    sys.exit("unknown command " + cmd)
