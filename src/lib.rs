//! agentmount: the state of an AI-agent orchestration platform as plain files.
//!
//! `store` knows the backing store and needs no mount (the CLI's gc and fsck use it
//! directly); `fs` is the mounted tree and its thin adapter onto fuser.

pub mod backend;
pub mod cli;
pub mod copy;
pub mod error;
pub mod follow;
pub mod fs;
pub mod fusermount;
pub mod journal;
pub mod mount;
pub mod store;
