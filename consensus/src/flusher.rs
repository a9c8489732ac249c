//! Group commit: one thread makes appended log entries durable for every group at once.
//!
//! openraft waits for a group's append to be flushed before it appends again, so each group has
//! at most one flush in flight. With many groups (and many concurrent HTTP batches) the waits
//! line up: the flusher takes every pending callback, flushes sled once, and completes them all.
//! One `fsync`-class flush thus acknowledges many groups' entries.
//!
//! Votes, truncations and purges wait on the same thread ([`Flusher::flush`]) rather than on
//! sled's `flush_async`: that one waits on a thread of sled's own small pool, the pool that also
//! writes the buffers being waited for, and enough concurrent waits (every group voting at a
//! cluster's first election) left no thread to write them: the process hung for good.

use crate::TypeConfig;
use openraft::storage::LogFlushed;
use std::sync::mpsc;

/// A handle to the flusher thread. Cloning is cheap; the thread ends when every handle is gone.
#[derive(Debug, Clone)]
pub struct Flusher {
    tx: mpsc::Sender<Waiter>,
}

/// Who waits for the next flush.
enum Waiter {
    /// openraft, for appended entries.
    Log(LogFlushed<TypeConfig>),
    /// A task, for a vote, truncation or purge.
    Task(tokio::sync::oneshot::Sender<std::io::Result<()>>),
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Waiter::Log(_) => "Waiter::Log",
            Waiter::Task(_) => "Waiter::Task",
        })
    }
}

impl Flusher {
    /// Starts the flusher thread of `db`.
    pub fn start(db: sled::Db) -> Flusher {
        let (tx, rx) = mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut pending = vec![first];
                    pending.extend(rx.try_iter());
                    let started = std::time::Instant::now();
                    let result = db.flush().map(|_| ());
                    tracing::trace!(
                        waiters = pending.len(),
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "flushed the log"
                    );
                    let outcome = || match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::other(e.to_string())),
                    };
                    for waiter in pending {
                        match waiter {
                            Waiter::Log(callback) => callback.log_io_completed(outcome()),
                            Waiter::Task(done) => {
                                let _ = done.send(outcome());
                            }
                        }
                    }
                }
            })
            .expect("spawning the flusher thread");
        Flusher { tx }
    }

    /// Completes `callback` once everything written so far is durable.
    pub fn flush_then(&self, callback: LogFlushed<TypeConfig>) {
        if let Err(mpsc::SendError(Waiter::Log(callback))) = self.tx.send(Waiter::Log(callback)) {
            callback.log_io_completed(Err(std::io::Error::other("the log flusher has stopped")));
        }
    }

    /// Returns once everything written so far is durable.
    pub async fn flush(&self) -> std::io::Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Waiter::Task(done))
            .map_err(|_| std::io::Error::other("the log flusher has stopped"))?;
        wait.await
            .map_err(|_| std::io::Error::other("the log flusher has stopped"))?
    }
}
