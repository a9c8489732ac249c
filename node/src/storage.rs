//! Event storage: columnar chunks (bodies in files, metadata in sled), the partition state
//! machine that writes them, and the group commit that feeds it.

pub mod batcher;
pub mod chunk;
pub mod chunk_files;
pub mod partition;

/// Nice value of threads that do background storage work (sealing): above the default 0, so
/// when the cores are contended the scheduler runs the threads that acknowledge requests
/// (Raft, the log's sync, the HTTP and QUIC tasks) first. Background work is never starved by
/// it: a thread of nice 10 still gets about a tenth of a contended core, and all idle time.
/// RocksDB lowers its compaction threads' priority for the same reason.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority to [`BACKGROUND_NICE`]. On Linux the nice
/// value belongs to a thread, not the process, so only this thread changes. A system that
/// refuses it leaves the thread as it was, with a warning (the work is the same, only its
/// place in the queue for a core differs).
pub fn run_as_background_thread() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE)
    {
        tracing::warn!(error = %e, "could not lower a background thread's priority");
    }
}
