//! Errors of the consensus crate.

/// What can go wrong starting or driving a group.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled failed.
    #[error("storage error")]
    Sled(#[from] sled::Error),
    /// The Raft log could not be opened.
    #[error("raft log error")]
    Wal(#[from] crate::wal::WalError),
    /// Reading or writing the Raft log failed.
    #[error("raft log i/o error")]
    LogIo(#[from] std::io::Error),
    /// openraft refused its configuration.
    #[error("invalid raft configuration")]
    Config(#[from] openraft::ConfigError),
    /// openraft stopped with a fatal error.
    #[error("raft group {group} stopped")]
    Fatal {
        /// The group.
        group: crate::GroupId,
        /// Why.
        #[source]
        source: openraft::error::Fatal<u64>,
    },
    /// Stored bytes could not be decoded.
    #[error("corrupt stored value in {what}")]
    Corrupt {
        /// Which value.
        what: String,
        /// The decoding error.
        #[source]
        source: bincode::error::DecodeError,
    },
}

impl Error {
    /// Whether retrying the same operation later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Sled(sled::Error::Io(_)) | Error::Wal(crate::wal::WalError::Io { .. })
        )
    }

    /// A stable code for operators.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Sled(_) => "storage",
            Error::Wal(_) | Error::LogIo(_) => "raft_log",
            Error::Config(_) => "config",
            Error::Fatal { .. } => "raft_fatal",
            Error::Corrupt { .. } => "corrupt",
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
