//! The one error type of distill's library crates. Every variant that comes from a file names it, so
//! that the CLI can print a single line a user can act on.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed at the OS level.
    /// (`cause` is not marked as the error source: its text is already in the message, and the
    /// CLI prints the whole chain on one line.)
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A file exists but its content is wrong (bad JSON, missing field, wrong shape, truncated...).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A request the code understands but does not support (an architecture, a rope type...).
    #[error("{0}")]
    Unsupported(String),
    /// A device that cannot be used in this build or on this machine.
    #[error("{0}")]
    Device(String),
    /// A tensor operation failed; these are bugs or resource exhaustion, not user errors.
    /// (Only the first line: candle appends a backtrace when RUST_BACKTRACE is set.)
    #[error("tensor error: {}", one_line(&.0.to_string()))]
    Candle(#[from] candle_core::Error),
    /// Anything else with a message.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            cause: source,
        }
    }

    pub fn file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: one_line(&msg.to_string()),
        }
    }
}

/// Errors from candle and serde can span lines (backtraces, context); the CLI prints one line.
pub fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or("").trim();
    first.to_string()
}

/// Adds the file a failure concerns to any error convertible to a message.
pub trait FileContext<T> {
    fn with_file(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T, E: std::fmt::Display> FileContext<T> for std::result::Result<T, E> {
    fn with_file(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::file(path, e))
    }
}
