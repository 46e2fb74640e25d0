//! The Postgres backend against native work in the same run, on a real PostgreSQL server
//! started for the run (Unix socket, fsync on): reads, upserts, cross-host visibility,
//! ingest, warm attachment reads from the local cache, and throughput with 1, 2 and 4
//! daemons on one server.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use serde_json::{Value, json};

use super::{BIN, Row, medians, ms, quick, ratio, read_all, session, us};

#[path = "../../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

struct PgMount {
    dir: std::path::PathBuf,
}

impl PgMount {
    fn new(url: &str, mp: &Path, state: &Path) -> PgMount {
        std::fs::create_dir_all(mp).unwrap();
        let o = Command::new(BIN)
            .args(["mount", "--store", url, "--state-dir"])
            .arg(state)
            .arg(mp)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        PgMount {
            dir: mp.to_path_buf(),
        }
    }
    fn status(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join(".status")).unwrap()).unwrap()
    }
}

impl Drop for PgMount {
    fn drop(&mut self) {
        let _ = Command::new(BIN).arg("unmount").arg(&self.dir).output();
    }
}

fn present(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap();
    s.push('\n');
    s
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

pub fn rows(b: &Path, rows: &mut Vec<Row>) {
    let server = pg::Server::private("bench");
    let url = server.new_db();
    let n = if quick() { 1000 } else { 10_000 };
    // The schema, made by a first mount; then n sessions loaded natively.
    let a = PgMount::new(&url, &b.join("pg-a"), &b.join("pg-state-a"));
    drop(a);
    let mut native = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    {
        let mut tx = native.transaction().unwrap();
        let w = tx
            .copy_in("COPY agentmount_records (collection, id, body) FROM STDIN (FORMAT binary)")
            .unwrap();
        let mut w = BinaryCopyInWriter::new(w, &[Type::TEXT, Type::TEXT, Type::TEXT]);
        for i in 0..n {
            let (id, v) = session(i);
            w.write(&[&"sessions", &id, &present(&v)]).unwrap();
        }
        w.finish().unwrap();
        tx.commit().unwrap();
    }
    let a = PgMount::new(&url, &b.join("pg-a"), &b.join("pg-state-a"));
    let bm = PgMount::new(&url, &b.join("pg-b"), &b.join("pg-state-b"));
    let (id, _) = session(n / 2);
    let rec_a = a.dir.join(format!("sessions/{id}.json"));
    let rec_b = bm.dir.join(format!("sessions/{id}.json"));

    // Read one session: open+read+close vs a prepared SELECT of its body.
    std::fs::read(&rec_a).unwrap();
    let st = native
        .prepare("SELECT body FROM agentmount_records WHERE collection = $1 AND id = $2")
        .unwrap();
    let (ours_read, native_read) = medians(
        2000,
        |_| std::fs::read(&rec_a).unwrap(),
        |_| {
            native
                .query_one(&st, &[&"sessions", &id])
                .unwrap()
                .get::<_, String>(0)
        },
    );
    rows.push(Row {
        what: format!("postgres: read one session at {n} (open+read+close, median)"),
        ours: us(ours_read),
        native: format!(
            "{} (postgres crate, prepared SELECT body, own connection, Unix socket)",
            us(native_read)
        ),
        ratio: ratio(ours_read, native_read),
        target: "report",
    });

    // Upsert one session: write the whole file + close (returns after COMMIT) vs one
    // native transaction replacing the body.
    let k = if quick() { 20 } else { 100 };
    let mut v: Value = serde_json::from_slice(&std::fs::read(&rec_a).unwrap()).unwrap();
    let nv = v.clone();
    let up = native
        .prepare(
            "UPDATE agentmount_records SET body = $1 WHERE collection = 'sessions' AND id = $2",
        )
        .unwrap();
    let (ours_up, native_up) = medians(
        k,
        |i| {
            v["task"] = json!(format!("ours {i}"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&rec_a)
                .unwrap();
            f.write_all(&serde_json::to_vec_pretty(&v).unwrap())
                .unwrap();
        },
        |i| {
            let mut tx = native.transaction().unwrap();
            let mut w = nv.clone();
            w["task"] = json!(format!("native {i}"));
            tx.execute(&up, &[&present(&w), &id]).unwrap();
            tx.commit().unwrap();
        },
    );
    rows.push(Row {
        what: format!("postgres: upsert one session at {n} (write whole file + close, median)"),
        ours: ms(ours_up),
        native: format!(
            "{} (BEGIN; UPDATE body; COMMIT; fsync on, same server)",
            ms(native_up)
        ),
        ratio: ratio(ours_up, native_up),
        target: "report",
    });

    // A write acknowledged on A: the next open on B reads it (B checks the version at
    // open), and B's cached stat shows it once NOTIFY reached B and it invalidated.
    let (mut open_lat, mut stat_lat, mut stale) = (Vec::new(), Vec::new(), 0);
    for i in 0..100 {
        let _ = std::fs::metadata(&rec_b).unwrap();
        v["task"] = json!(format!("cross {i} {}", "y".repeat(i % 2)));
        let bytes = serde_json::to_vec_pretty(&v).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&rec_a)
            .unwrap();
        f.write_all(&bytes).unwrap();
        drop(f);
        let t0 = Instant::now();
        let got = std::fs::read(&rec_b).unwrap();
        open_lat.push(t0.elapsed());
        stale += u32::from(got != bytes);
        let t0 = Instant::now();
        while std::fs::metadata(&rec_b).unwrap().len() != bytes.len() as u64 {
            if t0.elapsed() > Duration::from_secs(3) {
                break;
            }
            std::hint::spin_loop();
        }
        stat_lat.push(t0.elapsed());
    }
    rows.push(Row {
        what: format!("postgres: write acknowledged on host A -> open+read on host B, at {n}"),
        ours: format!(
            "median {} p90 {} max {} ({} trials, {stale} read the old bytes)",
            us(percentile(&mut open_lat, 50)),
            us(percentile(&mut open_lat, 90)),
            us(percentile(&mut open_lat, 100)),
            open_lat.len()
        ),
        native: "-".into(),
        ratio: "-".into(),
        target: "< 10 ms median, never > TTL (1 s)",
    });
    rows.push(Row {
        what: format!(
            "postgres: write acknowledged on host A -> stat on host B shows it (NOTIFY), at {n}"
        ),
        ours: format!(
            "median {} p90 {} max {}",
            us(percentile(&mut stat_lat, 50)),
            us(percentile(&mut stat_lat, 90)),
            us(percentile(&mut stat_lat, 100)),
        ),
        native: "-".into(),
        ratio: "-".into(),
        target: "< 10 ms median, never > TTL (1 s)",
    });

    // Ingest 128 MiB: cp into attachments/ (returns once the bytes are committed in
    // Postgres) vs its floor: the larger of a native COPY of the same bytes in 1 MiB chunks
    // into a table of the same shape, and one SHA-256 stream of them.
    let mib = if quick() { 16 } else { 128 };
    let src = b.join(format!("pg-src-{mib}.bin"));
    {
        let mut f = std::fs::File::create(&src).unwrap();
        // Incompressible bytes, as images and archives are (Postgres compresses bytea it
        // can: a repeating pattern would measure pglz, not storage).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        for k in 0..mib {
            let mut c = chunk.clone();
            c[..8].copy_from_slice(&(k as u64).to_le_bytes());
            f.write_all(&c).unwrap();
        }
    }
    read_all(&src);
    native
        .batch_execute(
            "CREATE TABLE native_chunks (hex text, n int, data bytea, PRIMARY KEY (hex, n))",
        )
        .unwrap();
    let data = std::fs::read(&src).unwrap();
    let native_copy = |c: &mut postgres::Client, tag: usize| {
        let t0 = Instant::now();
        let mut tx = c.transaction().unwrap();
        let w = tx
            .copy_in("COPY native_chunks (hex, n, data) FROM STDIN (FORMAT binary)")
            .unwrap();
        let mut w = BinaryCopyInWriter::new(w, &[Type::TEXT, Type::INT4, Type::BYTEA]);
        let key = format!("run-{tag}");
        for (i, ch) in data.chunks(1 << 20).enumerate() {
            w.write(&[&key, &(i as i32), &ch]).unwrap();
        }
        w.finish().unwrap();
        tx.commit().unwrap();
        t0.elapsed()
    };
    let sha = || {
        let t0 = Instant::now();
        let mut h = agentmount::store::hash::Sha256::new();
        for ch in data.chunks(1 << 20) {
            h.update(ch);
        }
        std::hint::black_box(h.finish_hex());
        t0.elapsed()
    };
    let (mut ours_t, mut copy_t, mut sha_t) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let dst = a.dir.join(format!("attachments/in-{round}.bin"));
        // Each round new bytes (a different first byte), so nothing is deduplicated.
        let mut d = data.clone();
        d[8] = round as u8 + 1;
        let s = b.join(format!("pg-src-{mib}-{round}.bin"));
        std::fs::write(&s, &d).unwrap();
        read_all(&s);
        let t0 = Instant::now();
        assert!(
            Command::new("cp")
                .arg(&s)
                .arg(&dst)
                .status()
                .unwrap()
                .success()
        );
        ours_t.push(t0.elapsed());
        std::fs::remove_file(&s).unwrap();
        copy_t.push(native_copy(&mut native, round));
        sha_t.push(sha());
    }
    let (ours_i, copy_i, sha_i) = (
        percentile(&mut ours_t, 50),
        percentile(&mut copy_t, 50),
        percentile(&mut sha_t, 50),
    );
    let floor = copy_i.max(sha_i);
    let phases = a.status()["last_ingest"].clone();
    rows.push(Row {
        what: format!(
            "postgres: cp {mib} MiB into attachments/ (median of 3; phases of the last: {phases})"
        ),
        ours: ms(ours_i),
        native: format!(
            "floor {} = max(native COPY of 1 MiB chunks {}, one SHA-256 stream {})",
            ms(floor),
            ms(copy_i),
            ms(sha_i)
        ),
        ratio: ratio(ours_i, floor),
        target: "report (DESIGN: streamed, never whole in memory)",
    });
    drop(data);

    // Warm reads on B from its local cache vs a native read of a local copy.
    let big = if quick() { 16 } else { 256 };
    let bytes: Vec<u8> = (0..big << 20).map(|i| (i * 31 % 251) as u8).collect();
    let local = b.join("pg-big.bin");
    std::fs::write(&local, &bytes).unwrap();
    drop(bytes);
    assert!(
        Command::new("cp")
            .arg(&local)
            .arg(a.dir.join("attachments/big.bin"))
            .status()
            .unwrap()
            .success()
    );
    let on_b = bm.dir.join("attachments/big.bin");
    let t0 = Instant::now();
    let got = read_all(&on_b);
    let cold = t0.elapsed();
    assert_eq!(got, (big as u64) << 20);
    read_all(&on_b);
    read_all(&local);
    let (mut ours_w, mut native_w) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t0 = Instant::now();
        read_all(&on_b);
        ours_w.push(t0.elapsed());
        let t0 = Instant::now();
        read_all(&local);
        native_w.push(t0.elapsed());
    }
    let (ow, nw) = (percentile(&mut ours_w, 50), percentile(&mut native_w, 50));
    let gbps = |d: Duration| big as f64 / 1024.0 / d.as_secs_f64();
    rows.push(Row {
        what: format!(
            "postgres: read a {big} MiB attachment on host B, warm from its cache (first, cold read fetched it from the server: {})",
            ms(cold)
        ),
        ours: format!("{:.2} GB/s", gbps(ow)),
        native: format!("{:.2} GB/s (read of a local copy)", gbps(nw)),
        ratio: ratio(nw, ow),
        target: ">= 0.9x throughput",
    });
    drop(a);
    drop(bm);

    // Throughput with 1, 2 and 4 daemons on one server: each daemon's own writer upserts
    // records of its own and a reader opens and reads one, for a fixed time.
    let secs = if quick() { 1.0 } else { 3.0 };
    let mut table = Vec::new();
    for daemons in [1usize, 2, 4] {
        let mounts: Vec<PgMount> = (0..daemons)
            .map(|d| {
                PgMount::new(
                    &url,
                    &b.join(format!("pg-t{daemons}-{d}")),
                    &b.join(format!("pg-state-t{daemons}-{d}")),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (writes, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut threads = Vec::new();
        for (d, m) in mounts.iter().enumerate() {
            let dir = m.dir.clone();
            let (stop2, writes) = (stop.clone(), writes.clone());
            threads.push(std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop2.load(Ordering::Relaxed) {
                    let (id, mut v) = session(100_000 + d * 1000 + i % 50);
                    v["task"] = json!(format!("d{d} i{i}"));
                    let mut f =
                        std::fs::File::create(dir.join(format!("sessions/{id}.json"))).unwrap();
                    f.write_all(&serde_json::to_vec_pretty(&v).unwrap())
                        .unwrap();
                    drop(f);
                    writes.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }));
            let dir = m.dir.clone();
            let (stop2, reads) = (stop.clone(), reads.clone());
            let rid = id.clone();
            threads.push(std::thread::spawn(move || {
                let p = dir.join(format!("sessions/{rid}.json"));
                while !stop2.load(Ordering::Relaxed) {
                    std::hint::black_box(std::fs::read(&p).unwrap());
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let w = writes.load(Ordering::Relaxed) as f64 / secs;
        let r = reads.load(Ordering::Relaxed) as f64 / secs;
        table.push((daemons, w, r));
    }
    let (w1, r1) = (table[0].1, table[0].2);
    for (d, w, r) in table {
        rows.push(Row {
            what: format!(
                "postgres: {d} daemon(s) on one server, one writer + one reader each, {secs} s"
            ),
            ours: format!("{w:.0} upserts/s, {r:.0} reads/s in all"),
            native: format!("1 daemon: {w1:.0} upserts/s, {r1:.0} reads/s"),
            ratio: format!("{:.2}x / {:.2}x", w / w1, r / r1),
            target: "report (2 cores: server, daemons and load share them)",
        });
    }
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&local);
}
