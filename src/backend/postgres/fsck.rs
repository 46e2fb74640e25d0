//! `agentmount fsck` of a Postgres store, read-only: records, chunks, sidecars.

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use serde_json::Value;

use super::{col, pg_io};
use crate::error::{Result, StoreError};
use crate::store::hash::Sha256;

/// `agentmount fsck` of a Postgres store: every record is a JSON object, every blob's
/// chunks are in order and hash to its name, every sidecar parses. Read-only.
pub fn fsck(url: &str) -> Result<crate::store::fsck::FsckReport> {
    let mut r = crate::store::fsck::FsckReport::default();
    let mut c = super::connect_config(url)?
        .connect()
        .map_err(|why| StoreError::io("Postgres", std::io::Error::other(why)))?;
    let mut tx = c
        .build_transaction()
        .read_only(true)
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .map_err(|e| pg_io(&e))?;
    for row in tx
        .query("SELECT collection, id, body FROM agentmount_records", &[])
        .map_err(|e| pg_io(&e))?
    {
        r.checked_files += 1;
        let (coll, id, body): (String, String, String) =
            (col(&row, 0)?, col(&row, 1)?, col(&row, 2)?);
        if let Some(why) = super::damage_of(&body) {
            r.problems.push(format!("{coll}/{id}: {why}"));
        }
    }
    let blobs = tx
        .query("SELECT hex, size FROM agentmount_blobs ORDER BY hex", &[])
        .map_err(|e| pg_io(&e))?;
    for b in blobs {
        r.checked_files += 1;
        let hex: String = col(&b, 0)?;
        let size: i64 = col(&b, 1)?;
        let mut h = Sha256::new();
        let (mut got, mut expect_n) = (0i64, 0i32);
        let mut rows = tx
            .query_raw(
                "SELECT n, data FROM agentmount_chunks WHERE hex = $1 ORDER BY n",
                [&hex as &(dyn ToSql + Sync)],
            )
            .map_err(|e| pg_io(&e))?;
        while let Some(row) = rows.next().map_err(|e| pg_io(&e))? {
            let n: i32 = col(&row, 0)?;
            let data: &[u8] = col(&row, 1)?;
            if n != expect_n {
                r.problems
                    .push(format!("attachment {hex}: chunk {expect_n} is missing"));
            }
            expect_n = n + 1;
            got += data.len() as i64;
            h.update(data);
        }
        let digest = h.finish_hex();
        if got != size {
            r.problems.push(format!(
                "attachment {hex}: {got} bytes stored, {size} recorded"
            ));
        } else if digest != hex {
            r.problems
                .push(format!("attachment {hex}: its bytes hash to {digest}"));
        }
    }
    for orphan in tx
        .query(
            "SELECT DISTINCT c.hex FROM agentmount_chunks c
             LEFT JOIN agentmount_blobs b USING (hex) WHERE b.hex IS NULL",
            &[],
        )
        .map_err(|e| pg_io(&e))?
    {
        let hex: String = col(&orphan, 0)?;
        r.problems.push(format!(
            "chunks stored under {hex:?} belong to no attachment"
        ));
    }
    for s in tx
        .query("SELECT hex, body FROM agentmount_sidecars", &[])
        .map_err(|e| pg_io(&e))?
    {
        r.checked_files += 1;
        let hex: String = col(&s, 0)?;
        let body: Vec<u8> = col(&s, 1)?;
        if !matches!(serde_json::from_slice::<Value>(&body), Ok(Value::Object(_))) {
            r.problems
                .push(format!("sidecar of {hex}: not a JSON object"));
        }
    }
    tx.commit().map_err(|e| pg_io(&e))?;
    Ok(r)
}
