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

/// `std::fs::read` that names the file when it fails.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// `std::fs::read_to_string` that names the file when it fails.
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Reads a JSON-lines file of `what` records. A last line without its newline — a writer killed
/// mid-line — is not a record and is skipped; any other bad line is an error naming the file and
/// the line. Returns the records and the byte length of the complete lines (where an appender
/// resumes after cutting the torn tail).
pub fn read_jsonl<T: serde::de::DeserializeOwned>(
    path: impl AsRef<Path>,
    what: &str,
) -> Result<(Vec<T>, u64)> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out = Vec::new();
    for (i, line) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let rec = serde_json::from_slice(line)
            .map_err(|e| Error::file(path, format!("line {}: not {what}: {e}", i + 1)))?;
        out.push(rec);
    }
    Ok((out, complete as u64))
}

/// Writes a file through a temporary name in the same directory and renames it into place, so a
/// reader never sees a half-written file and a crash leaves the old content intact.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let tmp = tmp_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// `dir/.name.tmp` beside `path`.
pub fn tmp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}
