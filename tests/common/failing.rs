//! `Failing<B>`: a backend that is `B` in every way, except that one chosen seam call fails
//! (the N-th from when it was armed, or the first of a named method) with an injected
//! error instead of reaching `B`. A refused call reaches nothing, as the seam's contract
//! says of every refusal ("a refused change leaves the store as it was"); whatever the core
//! does with it must then leave the store unchanged too and give the error's errno.
//!
//! Every method that returns a `Result` is a seam call, counted in the log, except
//! `check_id`: it judges a name (no I/O), and an I/O error there would only be read as
//! "not a record name".
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use agentmount::backend::{
    Access, AttachmentStore, Backend, ChangeSink, Kind, ListView, RecordView,
};
use agentmount::error::{Result, StoreError};
use agentmount::store::attachments::Ingest;
use agentmount::store::blob_index::Listing;
use agentmount::store::gc::{GcOptions, GcReport};

/// The error a failing call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An I/O error (EIO): a disk, a lost connection.
    Io,
    /// The writer lock not taken in time (EAGAIN).
    Again,
}

impl Fault {
    pub const ALL: [Fault; 2] = [Fault::Io, Fault::Again];

    pub fn error(self, call: &str) -> StoreError {
        match self {
            Fault::Io => StoreError::io(
                format!("injected failure of {call}"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ),
            Fault::Again => StoreError::Again(format!("injected failure of {call}")),
        }
    }

    /// The errno the error maps to (`StoreError::errno`): what the caller must get.
    pub fn errno(self) -> i32 {
        self.error("").errno()
    }
}

#[derive(Default)]
struct Plan {
    /// The seam calls made since the plan was set, in order.
    calls: Vec<&'static str>,
    /// Fail the call at this position of `calls`...
    at: Option<usize>,
    /// ...or the first call of this method.
    method: Option<&'static str>,
    fault: Option<Fault>,
    /// The call that failed: its position and name.
    fired: Option<(usize, &'static str)>,
}

pub struct Failing<B: ?Sized> {
    inner: Arc<B>,
    plan: Mutex<Plan>,
}

impl<B: Backend + ?Sized> Failing<B> {
    pub fn new(inner: Arc<B>) -> Arc<Failing<B>> {
        Arc::new(Failing {
            inner,
            plan: Mutex::default(),
        })
    }

    /// From now on, counts the seam calls and fails none.
    pub fn count(&self) {
        *self.plan.lock().unwrap() = Plan::default();
    }

    /// From now on, the `n`-th seam call (0: the next one) fails with `fault`, once.
    pub fn fail_at(&self, n: usize, fault: Fault) {
        *self.plan.lock().unwrap() = Plan {
            at: Some(n),
            fault: Some(fault),
            ..Plan::default()
        };
    }

    /// From now on, the first call of `method` fails with `fault`.
    pub fn fail_method(&self, method: &'static str, fault: Fault) {
        *self.plan.lock().unwrap() = Plan {
            method: Some(method),
            fault: Some(fault),
            ..Plan::default()
        };
    }

    /// The seam calls made since the plan was set.
    pub fn calls(&self) -> Vec<&'static str> {
        self.plan.lock().unwrap().calls.clone()
    }

    /// The call that failed, if one did.
    pub fn fired(&self) -> Option<(usize, &'static str)> {
        self.plan.lock().unwrap().fired
    }

    /// Counts a call of `name`; the injected error if it is the one to fail.
    fn seam(&self, name: &'static str) -> Result<()> {
        let mut p = self.plan.lock().unwrap();
        let n = p.calls.len();
        p.calls.push(name);
        let hit = p.fired.is_none() && (p.at == Some(n) || p.method == Some(name));
        match p.fault {
            Some(f) if hit => {
                p.fired = Some((n, name));
                Err(f.error(name))
            }
            _ => Ok(()),
        }
    }

    fn att(&self) -> &dyn AttachmentStore {
        self.inner
            .attachments()
            .expect("attachments() said this backend has them")
    }
}

impl<B: Backend + ?Sized> Backend for Failing<B> {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    fn collections(&self) -> &'static [Kind] {
        self.inner.collections()
    }
    fn check_id(&self, kind: Kind, id: &str) -> Result<()> {
        self.inner.check_id(kind, id)
    }
    fn get(&self, kind: Kind, id: &str) -> Result<Option<RecordView>> {
        self.seam("get")?;
        self.inner.get(kind, id)
    }
    fn list(&self, kind: Kind) -> Result<ListView> {
        self.seam("list")?;
        self.inner.list(kind)
    }
    fn count(&self, kind: Kind) -> usize {
        self.inner.count(kind)
    }
    fn upsert(&self, kind: Kind, id: &str, bytes: &[u8]) -> Result<RecordView> {
        self.seam("upsert")?;
        self.inner.upsert(kind, id, bytes)
    }
    fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        self.seam("remove")?;
        self.inner.remove(kind, id)
    }
    fn rekey(&self, kind: Kind, from: &str, to: &str) -> Result<RecordView> {
        self.seam("rekey")?;
        self.inner.rekey(kind, from, to)
    }
    fn collection_error(&self, kind: Kind) -> Option<String> {
        self.inner.collection_error(kind)
    }
    fn max_record_bytes(&self) -> u64 {
        self.inner.max_record_bytes()
    }
    fn read_only_reason(&self) -> Option<String> {
        self.inner.read_only_reason()
    }
    fn root_time(&self) -> SystemTime {
        self.inner.root_time()
    }
    fn collection_time(&self, kind: Kind) -> SystemTime {
        self.inner.collection_time(kind)
    }
    fn state_dir(&self) -> PathBuf {
        self.inner.state_dir()
    }
    fn access(&self) -> Option<Access> {
        self.inner.access()
    }
    fn statfs_path(&self) -> PathBuf {
        self.inner.statfs_path()
    }
    fn attachments(&self) -> Option<&dyn AttachmentStore> {
        self.inner
            .attachments()
            .map(|_| self as &dyn AttachmentStore)
    }
    fn watch(self: Arc<Self>, sink: Arc<dyn ChangeSink>) -> Result<()> {
        self.seam("watch")?;
        B::watch(self.inner.clone(), sink)
    }
    fn status(&self) -> serde_json::Value {
        self.inner.status()
    }
}

impl<B: Backend + ?Sized> AttachmentStore for Failing<B> {
    fn listing(&self) -> Result<Arc<Listing>> {
        self.seam("listing")?;
        self.att().listing()
    }
    fn open_blob(&self, hex: &str) -> Result<File> {
        self.seam("open_blob")?;
        self.att().open_blob(hex)
    }
    fn sidecar_bytes(&self, hex: &str) -> Result<(Vec<u8>, SystemTime)> {
        self.seam("sidecar_bytes")?;
        self.att().sidecar_bytes(hex)
    }
    fn blob_meta(&self, hex: &str) -> Result<Option<(u64, SystemTime, SystemTime)>> {
        self.seam("blob_meta")?;
        self.att().blob_meta(hex)
    }
    fn begin_ingest(&self) -> Result<Ingest> {
        self.seam("begin_ingest")?;
        self.att().begin_ingest()
    }
    fn finish_ingest(&self, ingest: Ingest, label: Option<&str>) -> Result<String> {
        self.seam("finish_ingest")?;
        self.att().finish_ingest(ingest, label)
    }
    fn finish_put(&self, ingest: Ingest, hex: &str) -> Result<()> {
        self.seam("finish_put")?;
        self.att().finish_put(ingest, hex)
    }
    fn put_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.seam("put_sidecar")?;
        self.att().put_sidecar(hex, bytes)
    }
    fn import_sidecar(&self, hex: &str, bytes: &[u8]) -> Result<()> {
        self.seam("import_sidecar")?;
        self.att().import_sidecar(hex, bytes)
    }
    fn intent(&self, hex: &str) -> Result<Option<bool>> {
        self.seam("intent")?;
        self.att().intent(hex)
    }
    fn set_intent(&self, hex: &str, state: Option<bool>) -> Result<()> {
        self.seam("set_intent")?;
        self.att().set_intent(hex, state)
    }
    fn relabel(&self, hex: &str, old: Option<&str>, label: &str) -> Result<()> {
        self.seam("relabel")?;
        self.att().relabel(hex, old, label)
    }
    fn unlabel(&self, label: &str) -> Result<()> {
        self.seam("unlabel")?;
        self.att().unlabel(label)
    }
    fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        self.seam("gc")?;
        self.att().gc(opts)
    }
    fn last_gc(&self) -> Option<GcReport> {
        self.att().last_gc()
    }
    fn index_mode(&self) -> String {
        self.att().index_mode()
    }
}
