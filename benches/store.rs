//! Store costs at N sessions (default 10,000), against the native way in the same run.
//! Run: `cargo bench --bench store` (or scripts/bench-store.sh). Prints a table; asserts nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use agentmount::store::{Kind, Layout, Options, Store};
use serde_json::{Value, json};

fn session(i: usize) -> (String, Value) {
    let id = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
    let v = json!({
        "id": id, "tmux_name": format!("tm-{i}"), "cwd": "/home/dev/projects/api", "task": format!("task number {i}"),
        "state": "active", "created_at": "2026-11-20T09:12:03Z", "last_activity_at": null, "workspace_path": null,
        "repo_url": "https://example.invalid/acme/api.git", "branch": "main", "pending_decision": null, "proposed_default": null,
        "correlation": {"worktree": null, "branch": null, "pr_id": i, "issue_id": null}, "runtime": "claude-code",
        "ephemeral": false, "workspace_owned": false, "pane_id": "%5", "injection_status": "not_applicable", "terminal_at": null
    });
    (id, v)
}

fn time<R>(n: usize, mut f: impl FnMut(usize) -> R) -> Duration {
    let t0 = Instant::now();
    for i in 0..n {
        black_box(f(i));
    }
    t0.elapsed() / n as u32
}

/// trusty-mpm's own upsert: reload the file, change one session, temp file, fsync, rename.
fn native_upsert(path: &std::path::Path, id: &str, rec: &Value) {
    let mut doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    doc["sessions"][id] = rec.clone();
    let tmp = path.with_extension("native-tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
    std::fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

fn main() {
    let n: usize = std::env::var("BENCH_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session-manager/sessions.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let sessions: serde_json::Map<String, Value> = (0..n).map(session).collect();
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&json!({"sessions": sessions})).unwrap(),
    )
    .unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    let store = Store::open(Layout::new(dir.path()), Options::default()).unwrap();
    let (id, mut rec) = session(n / 2);
    store.get(Kind::Sessions, &id).unwrap();

    let check = time(2000, |_| store.get(Kind::Sessions, &id).unwrap());
    let reparse = time(10, |i| {
        // Touch the file so the fingerprint changes (ctime/mtime), forcing a re-parse.
        let t = std::time::SystemTime::now() + Duration::from_secs(i as u64 + 1);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(t)
            .unwrap();
        store.get(Kind::Sessions, &id).unwrap()
    });
    // A file in another layout (compact JSON), changed before its records: nothing can be
    // reused, every record is parsed.
    let pretty = std::fs::read(&path).unwrap();
    // The mean time of a read after each of `n` writes (the writes not counted), leaving
    // out the first `skip`.
    let read_after = |n: usize, skip: usize, mut write: Box<dyn FnMut(usize) + '_>| {
        let mut total = Duration::ZERO;
        for i in 0..n {
            write(i);
            let t0 = Instant::now();
            black_box(store.get(Kind::Sessions, &id).unwrap());
            if i >= skip {
                total += t0.elapsed();
            }
        }
        total / (n - skip) as u32
    };
    let full = read_after(
        10,
        0,
        Box::new(|i| {
            let compact = serde_json::to_vec(&json!({"rev": i, "sessions": sessions})).unwrap();
            std::fs::write(&path, &compact).unwrap();
        }),
    );
    std::fs::write(&path, &pretty).unwrap();
    let native_read = time(10, |_| {
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        doc["sessions"][&id]["task"].clone()
    });
    // Another writer changes one session, trusty-mpm's way (the whole file rewritten).
    // The first follows the compact file above: a change of layout, parsed whole.
    let mut doc: Value = serde_json::from_slice(&pretty).unwrap();
    let one = read_after(
        11,
        1,
        Box::new(|i| {
            doc["sessions"][&id]["task"] = json!(format!("external {i}"));
            std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        }),
    );
    let ours = time(20, |i| {
        rec["task"] = json!(format!("ours {i}"));
        store
            .upsert(Kind::Sessions, &id, &serde_json::to_vec(&rec).unwrap())
            .unwrap()
    });
    let native = time(20, |i| {
        rec["task"] = json!(format!("native {i}"));
        native_upsert(&path, &id, &rec)
    });
    println!(
        "store benchmark: {n} sessions, sessions.json {:.1} MiB",
        size as f64 / 1048576.0
    );
    println!("{:<44} {:>12} {:>12}", "operation", "time", "vs native");
    // A row: the time in µs or ms, and how it compares ("how many times faster" for reads).
    let row = |what: &str, d: Duration, vs: Option<f64>, micros: bool| {
        let (t, unit) = if micros {
            (d.as_secs_f64() * 1e6, "µs")
        } else {
            (d.as_secs_f64() * 1e3, "ms")
        };
        let vs = vs.map_or("1.00x".to_string(), |r| {
            if r >= 100.0 {
                format!("{r:.0}x")
            } else {
                format!("{r:.2}x")
            }
        });
        println!("{what:<44} {t:>10.1}{unit} {vs:>12}");
    };
    let faster = |d: Duration| Some(native_read.as_secs_f64() / d.as_secs_f64());
    row(
        "reload-check, nothing changed (get one)",
        check,
        faster(check),
        true,
    );
    row(
        "reload after a change, records unchanged",
        reparse,
        faster(reparse),
        false,
    );
    row(
        "reload after another writer changed one",
        one,
        faster(one),
        false,
    );
    row(
        "reload, every record parsed (compact file)",
        full,
        faster(full),
        false,
    );
    row(
        "native: parse sessions.json, get one",
        native_read,
        None,
        false,
    );
    let vs_native = ours.as_secs_f64() / native.as_secs_f64();
    row(
        "upsert one session (lock, CAS, fsync, rename)",
        ours,
        Some(vs_native),
        false,
    );
    row("native upsert (trusty-mpm's way)", native, None, false);
    println!(
        "(\"vs native\": for reads, how many times faster than parsing the file; for upserts, our time / native time)"
    );
}
