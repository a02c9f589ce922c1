//! File I/O that names the file when it fails: whole-file reads, JSON lines, and writes that are
//! atomic (a temporary name renamed into place) for single files and for whole directories.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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

/// Replaces the directory `dir` by `tmp` (a complete new one, usually `tmp_name(dir)`): the old
/// content moves aside to `.NAME.old` first and is removed only once the new one is in place. A
/// crash never leaves a half-written dir under `dir`: there is the old one, the new one, or (between
/// the two renames) nothing, with the old one intact as `.NAME.old` beside it.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = dir.with_file_name(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if !dir.exists() {
        return std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e));
    }
    std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
}

/// A fresh, empty `tmp_name(dir)` to assemble a new `dir` in (a stale one from a crash is removed).
pub fn fresh_tmp_dir(dir: &Path) -> Result<PathBuf> {
    let tmp = tmp_name(dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}
