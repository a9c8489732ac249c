//! Group commit: one thread makes appended log entries durable for every group at once.
//!
//! openraft waits for a group's append to be flushed before it appends again, so each group has
//! at most one flush in flight. With many groups (and many concurrent HTTP batches) the waits
//! line up: the flusher takes every pending callback, flushes sled once, and completes them all.
//! One `fsync`-class flush thus acknowledges many groups' entries.

use crate::TypeConfig;
use openraft::storage::LogFlushed;
use std::sync::mpsc;

/// A handle to the flusher thread. Cloning is cheap; the thread ends when every handle is gone.
#[derive(Debug, Clone)]
pub struct Flusher {
    tx: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl Flusher {
    /// Starts the flusher thread of `db`.
    pub fn start(db: sled::Db) -> Flusher {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut pending = vec![first];
                    pending.extend(rx.try_iter());
                    let result = db.flush().map(|_| ());
                    for callback in pending {
                        callback.log_io_completed(match &result {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        });
                    }
                }
            })
            .expect("spawning the flusher thread");
        Flusher { tx }
    }

    /// Completes `callback` once everything written so far is durable.
    pub fn flush_then(&self, callback: LogFlushed<TypeConfig>) {
        if let Err(mpsc::SendError(callback)) = self.tx.send(callback) {
            callback.log_io_completed(Err(std::io::Error::other("the log flusher has stopped")));
        }
    }
}
