#!/usr/bin/env python3
"""Creates a SQLite database exactly as arbiter-storage 0.5's SqliteStorage::new does --
WAL mode, its three sqlx migrations (examples/arbiter/migrations, copied verbatim from the
crate, Apache-2.0) recorded in _sqlx_migrations with sqlx's SHA-384 checksums, so arbiter
itself opens it -- and fills it with sample rows written the way its SqliteStorage writes
them (timestamps to_rfc3339, JSON-array columns, lowercase enums).

    make_db.py DB [--sessions N]        (default 3 sessions, 2 agents, 1 delegation)

Standard library only. Prints the first session's id.
"""
import hashlib, os, sqlite3, sys, uuid

HERE = os.path.dirname(os.path.abspath(__file__))

def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    db = args[0]
    n = int(args[args.index("--sessions") + 1]) if "--sessions" in args else 3
    if os.path.exists(db):
        print(f"make_db.py: {db} exists; refusing to touch it", file=sys.stderr)
        return 1
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("""CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
);""")
    mdir = os.path.join(HERE, "migrations")
    for name in sorted(os.listdir(mdir)):
        if not name.endswith(".sql"):
            continue
        version, rest = name.split("_", 1)
        sql = open(os.path.join(mdir, name), encoding="utf-8").read()
        con.execute("BEGIN")
        for stmt in split_sql(sql):
            con.execute(stmt)
        con.execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)"
            " VALUES (?, ?, TRUE, ?, 1000)",
            (int(version), rest[:-4].replace("_", " "), hashlib.sha384(sql.encode()).digest()),
        )
        con.execute("COMMIT")
    agents = [str(uuid.UUID(int=0x1a000000_0000_4000_8000_000000000001 + i)) for i in range(2)]
    con.execute("BEGIN")
    for i, a in enumerate(agents):
        con.execute(
            "INSERT INTO agents (id, owner, model, capabilities, trust_level, created_at, expires_at, active)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (a, "team-%d" % i, "claude-opus", '["read","write"]', ["basic", "verified"][i % 2],
             "2026-11-20T09:00:00+00:00", None, 1),
        )
    con.execute(
        "INSERT INTO delegation_links (from_agent, to_agent, scope_narrowing, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (agents[0], agents[1], '["read"]', "2026-11-20T09:05:00+00:00", "2026-11-21T09:05:00+00:00"),
    )
    first = None
    for i in range(n):
        sid = str(uuid.UUID(int=0x5e000000_0000_4000_8000_000000000000 + i))
        first = first or sid
        con.execute(
            "INSERT INTO sessions (session_id, agent_id, delegation_chain_snapshot, declared_intent,"
            " authorized_tools, time_limit_secs, call_budget, calls_made, rate_limit_per_minute,"
            " rate_window_start, rate_window_calls, rate_limit_window_secs, data_sensitivity_ceiling,"
            " created_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, agents[i % 2], "[]", "triage flaky login test %d" % i, '["read_file","run_tests"]',
             3600, 100, i, 60 if i % 2 else None, "2026-11-20T09:10:00+00:00", 0, 60,
             "internal", "2026-11-20T09:10:00+00:00", "active"),
        )
    con.execute("COMMIT")
    con.close()
    print(first)
    return 0

def split_sql(sql):
    """The migration files hold plain statements separated by ';' (no triggers)."""
    out, cur = [], []
    for line in sql.splitlines():
        if line.strip().startswith("--"):
            continue
        cur.append(line)
        if line.rstrip().endswith(";"):
            stmt = "\n".join(cur).strip()
            if stmt.strip(";").strip():
                out.append(stmt)
            cur = []
    return out

if __name__ == "__main__":
    sys.exit(main())
