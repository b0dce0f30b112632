//! The one way the broker appends to the commit log, and the gate of work only a leader does.
//!
//! Every change the broker makes is an entry proposed through [`LogWriter`]: sends, the
//! consumer journal, transaction decisions, timer copies and done records, dead letters and
//! resends. A use case may decide under its own lock and propose at once, but no reply leaves
//! before [`LogWriter::committed`] says the entries it depends on are committed: durable on this
//! node under `sync` flush, written under `async`. Replication changes what "committed" means
//! here (on a quorum) and nowhere else; a tidy test keeps every append in this file.
//!
//! [`Leadership`] gates the work a leader starts on its own: firing timers, transaction
//! check-backs, lease renewals and dead-letter sweeps, and retention. A standalone broker
//! always holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferrumq_storage::{Appended, LogPos, MessageStore, NewRecord};

use crate::config::FlushPolicy;

/// Proposes entries to the commit log and tells when they are committed.
#[derive(Clone)]
pub struct LogWriter {
    store: Arc<MessageStore>,
    /// Whether committed means durable (`sync` flush) rather than written.
    durable: bool,
}

impl LogWriter {
    pub fn new(store: Arc<MessageStore>, flush: FlushPolicy) -> LogWriter {
        LogWriter {
            store,
            durable: flush == FlushPolicy::Sync,
        }
    }

    /// The store the entries go to, for reading.
    pub fn store(&self) -> &Arc<MessageStore> {
        &self.store
    }

    /// Appends one entry; it is committed once [`committed`](Self::committed) says so.
    pub fn propose(&self, record: &NewRecord<'_>) -> ferrumq_storage::Result<Appended> {
        self.store.append(record)
    }

    /// Appends entries in order, each listed in `out` once written (also when a later one
    /// fails).
    pub fn propose_batch(
        &self,
        records: &[NewRecord<'_>],
        out: &mut Vec<Appended>,
    ) -> ferrumq_storage::Result<()> {
        self.store.append_batch(records, out)
    }

    /// Resolves once every entry before `end` is committed (at once for `None`).
    pub async fn committed(&self, end: Option<LogPos>) -> ferrumq_storage::Result<()> {
        match end {
            Some(end) if self.durable => self.store.durable(end).await,
            _ => Ok(()),
        }
    }

    /// [`committed`](Self::committed), blocking the calling thread.
    pub fn wait_committed(&self, end: Option<LogPos>) -> ferrumq_storage::Result<()> {
        match end {
            Some(end) if self.durable => self.store.durable(end).wait(),
            _ => Ok(()),
        }
    }
}

/// Whether this node may start leader-only work.
pub struct Leadership {
    held: AtomicBool,
    store: Arc<MessageStore>,
}

impl Leadership {
    /// A standalone broker's: always held.
    pub fn standalone(store: Arc<MessageStore>) -> Leadership {
        Leadership {
            held: AtomicBool::new(true),
            store,
        }
    }

    pub fn holds(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Takes or gives up leadership: leader-only work starts or stops at its next turn, and
    /// the store's retention with it.
    pub fn set(&self, held: bool) {
        self.held.store(held, Ordering::Release);
        self.store.pause_retention(!held);
    }
}
