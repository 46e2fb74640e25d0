//! Large ingests streamed into Postgres while they arrive: a `COPY` under a staging key in
//! one transaction, renamed to the hash at close.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;

use super::blobs::{CHUNK, Finish, Source, finish_tx};
use super::pg_io;
use crate::error::{Result, StoreError};
use crate::store::attachments;

/// At most this many ingests stream at once per daemon (each holds a connection of its own
/// outside the pool); more are stored at close.
const MAX_STREAMS: usize = 2;

/// Counts a running stream; gives its place back when the stream ends.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl StreamSlot {
    fn take(n: &Arc<std::sync::atomic::AtomicUsize>) -> Option<StreamSlot> {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            (v < MAX_STREAMS).then_some(v + 1)
        })
        .ok()
        .map(|_| StreamSlot(n.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Streaming starts once an ingest has this many bytes (smaller ones are stored at close
/// on a pooled connection: a connection and a thread of their own would cost more).
const STREAM_FROM: usize = 4 * CHUNK;

enum Msg {
    Chunk(Vec<u8>),
    Finish(Box<Finish>),
}

/// An ingest's bytes streamed into Postgres while they arrive ([`attachments::IngestTee`]):
/// gathered into 1 MiB chunks and handed (through a queue of a few chunks, so memory stays
/// bounded) to a thread holding one transaction with a `COPY` open under a staging key.
/// At close the chunks are renamed to the hash in that transaction, with the blob row,
/// intent and sidecar, and it commits: the close waits only for what had not arrived yet.
pub(super) struct Uploader {
    conn: super::Conninfo,
    slots: Arc<std::sync::atomic::AtomicUsize>,
    gathered: Vec<Vec<u8>>,
    buf: Vec<u8>,
    sent: u64,
    stream: Option<(
        std::sync::mpsc::SyncSender<Msg>,
        std::thread::JoinHandle<Result<()>>,
    )>,
}

impl Uploader {
    pub fn new(conn: super::Conninfo, slots: Arc<std::sync::atomic::AtomicUsize>) -> Uploader {
        Uploader {
            conn,
            slots,
            gathered: Vec::new(),
            buf: Vec::with_capacity(CHUNK),
            sent: 0,
            stream: None,
        }
    }

    fn send(&mut self, chunk: Vec<u8>) -> std::result::Result<(), String> {
        match &self.stream {
            Some((tx, _)) => tx
                .send(Msg::Chunk(chunk))
                .map_err(|_| "the streaming connection stopped".to_string()),
            None => {
                self.gathered.push(chunk);
                if self.gathered.len() * CHUNK < STREAM_FROM {
                    return Ok(());
                }
                let slot = StreamSlot::take(&self.slots)
                    .ok_or_else(|| format!("{MAX_STREAMS} ingests are streaming already"))?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(4);
                let conn = self.conn.clone();
                let join = std::thread::Builder::new()
                    .name("ingest-stream".into())
                    .spawn(move || {
                        let _slot = slot;
                        stream(conn, rx)
                    })
                    .map_err(|e| format!("start the streaming thread: {e}"))?;
                for c in std::mem::take(&mut self.gathered) {
                    tx.send(Msg::Chunk(c))
                        .map_err(|_| "the streaming connection stopped".to_string())?;
                }
                self.stream = Some((tx, join));
                Ok(())
            }
        }
    }

    /// Stores the ingest through the stream: `None` when nothing was streamed (small, or
    /// the stream had stopped), so the caller stores it from the temp file.
    pub(super) fn finish(mut self: Box<Self>, job: &Finish) -> Option<Result<()>> {
        let (tx, join) = self.stream.take()?;
        let rest = std::mem::take(&mut self.buf);
        if self.sent != job.size
            || (!rest.is_empty() && tx.send(Msg::Chunk(rest)).is_err())
            || tx
                .send(Msg::Finish(Box::new(Finish {
                    hex: job.hex.clone(),
                    size: job.size,
                    head: job.head.clone(),
                    label: job.label.clone(),
                })))
                .is_err()
        {
            drop(tx);
            return match join.join() {
                Ok(Err(e)) => Some(Err(e)),
                _ => None,
            };
        }
        drop(tx);
        Some(join.join().unwrap_or_else(|_| {
            Err(StoreError::io(
                "stream attachment",
                std::io::Error::other("the streaming thread panicked"),
            ))
        }))
    }
}

impl attachments::IngestTee for Uploader {
    fn push(&mut self, mut data: &[u8]) -> std::result::Result<(), String> {
        self.sent += data.len() as u64;
        while !data.is_empty() {
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
                self.send(full)?;
            }
        }
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// The streaming thread: one connection, one transaction, a `COPY` under a staging key
/// until the close says what the bytes are. A queue closed without that (the ingest was
/// abandoned) rolls everything back.
fn stream(conn: super::Conninfo, rx: std::sync::mpsc::Receiver<Msg>) -> Result<()> {
    let mut client = conn
        .connect()
        .map_err(|why| StoreError::io("Postgres", std::io::Error::other(why)))?;
    let mut tx = client.transaction().map_err(|e| pg_io(&e))?;
    tx.batch_execute("SET CONSTRAINTS agentmount_chunks_hex_fkey DEFERRED")
        .map_err(|e| pg_io(&e))?;
    let mut nonce = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(|_| {
        StoreError::io(
            "stream attachment",
            std::io::Error::other("no random bytes for a staging key"),
        )
    })?;
    let key = format!("staging-{}", attachments::to_hex(&nonce));
    let job = {
        let sink = tx
            .copy_in("COPY agentmount_chunks (hex, n, data) FROM STDIN (FORMAT binary)")
            .map_err(|e| pg_io(&e))?;
        let mut w = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::INT4, Type::BYTEA]);
        let mut n: i32 = 0;
        loop {
            match rx.recv() {
                Ok(Msg::Chunk(c)) => {
                    let data: &[u8] = &c;
                    w.write(&[&key, &n, &data]).map_err(|e| pg_io(&e))?;
                    n += 1;
                }
                Ok(Msg::Finish(job)) => {
                    w.finish().map_err(|e| pg_io(&e))?;
                    break job;
                }
                Err(_) => return Ok(()),
            }
        }
    };
    let mut stmts = HashMap::new();
    finish_tx(&mut tx, &mut stmts, &job, Source::Staged(&key))?;
    tx.commit().map_err(|e| pg_io(&e))
}
