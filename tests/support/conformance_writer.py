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
"declared_intent". postgres: agentmount's shared schema through psql (any SQL program
on any host); the marker is the session's "task".
"""
import fcntl, json, os, sqlite3, subprocess, sys

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


def psql(script, **vars):
    args = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for k, v in vars.items():
        args += ["-v", "%s=%s" % (k, v)]
    subprocess.run(args + [store], input=script, text=True, check=True, stdout=subprocess.DEVNULL)


def pg_set(sid, marker):
    psql("""INSERT INTO agentmount_records (collection, id, body)
        VALUES ('sessions', :'id', json_build_object('id', :'id', 'tmux_name', 'ext', 'cwd', '/',
            'task', :'marker', 'state', 'active', 'created_at', '2026-11-20T09:12:03Z')::text)
        ON CONFLICT (collection, id) DO UPDATE
        SET body = jsonb_pretty(jsonb_set(agentmount_records.body::jsonb, '{task}', to_jsonb(:'marker'::text)));""",
         id=sid, marker=marker)


def pg_delete(sid):
    psql("DELETE FROM agentmount_records WHERE collection = 'sessions' AND id = :'id';", id=sid)


SET = {"files": files_set, "sqlite": sqlite_set, "postgres": pg_set}
DELETE = {"files": files_delete, "sqlite": sqlite_delete, "postgres": pg_delete}

if cmd == "set":
    SET[backend](sys.argv[4], sys.argv[5])
elif cmd == "delete":
    DELETE[backend](sys.argv[4])
elif cmd == "loop":
    ids, rounds = sys.argv[4].split(","), int(sys.argv[5])
    con = db() if backend == "sqlite" else None
    for r in range(rounds):
        for sid in ids:
            marker = "ext-%d" % r
            if backend == "sqlite":
                sqlite_set(sid, marker, con)
            else:
                SET[backend](sid, marker)
            print("ack", sid, marker, flush=True)
elif cmd == "hold":
    import time
    if backend == "postgres":
        # A transaction holding the records table against writers until it ends.
        p = subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", store],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        p.stdin.write("BEGIN;\nLOCK TABLE agentmount_records IN EXCLUSIVE MODE;\n\\echo locked\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "locked"
        print("locked", flush=True)
        time.sleep(float(sys.argv[4]))
        p.stdin.write("ROLLBACK;\n")
        p.stdin.close()
        sys.exit(p.wait())
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
