//! Writing a checkpoint's files so that a crash mid-write never leaves a half-written
//! one under its real name.

use std::path::{Path, PathBuf};

/// Writes `path` through `path.tmp` and a rename.
pub(crate) fn replace_file(path: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}
