//! The SQLite file a demo or lab run writes from scratch.

use std::path::{Path, PathBuf};

use crate::error::CliError;

/// A database file no one else uses: the one the user named, which must not exist yet (a
/// run never overwrites a file), or a fresh one in a temporary directory of its own,
/// removed when this is dropped. Two runs at once never share a file.
pub struct ScratchDb {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl ScratchDb {
    /// `given`, if it names no existing file; else `name` in a new temporary directory.
    pub fn new(given: Option<&Path>, name: &str) -> Result<Self, CliError> {
        match given {
            Some(path) if path.exists() => Err(CliError::Exists(path.to_owned())),
            Some(path) => Ok(ScratchDb {
                path: path.to_owned(),
                _dir: None,
            }),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("idem-")
                    .tempdir()
                    .map_err(|e| CliError::io("cannot create a temporary directory", e))?;
                Ok(ScratchDb {
                    path: dir.path().join(name),
                    _dir: Some(dir),
                })
            }
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
