//! Text corpora: files (or directories of them) read as UTF-8 text, tokenized, joined
//! with the tokenizer's end-of-sequence token between documents, and packed into
//! windows of `seq_len + 1` tokens (inputs and their next-token targets).

use crate::model::Tok;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("--data {0}: no such file or directory")]
    Missing(PathBuf),
    #[error("--data {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("--data {0}: not UTF-8 text")]
    NotText(PathBuf),
    #[error("--data {0}: no text files in it")]
    Empty(PathBuf),
    #[error("tokenizing {path}: {err}")]
    Tokenize { path: PathBuf, err: String },
    #[error("--seq-len must be at least 1")]
    ZeroSeqLen,
    #[error("the data has {tokens} tokens: too few for one window of --seq-len {seq_len} (+1 target)")]
    TooShort { tokens: usize, seq_len: usize },
}

/// One tokenized stream of documents.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub tokens: Vec<u32>,
    pub files: Vec<PathBuf>,
}

/// Every file under `p` (itself if a file), sorted, hidden entries skipped.
fn files_under(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let meta = std::fs::metadata(p).map_err(|_| DataError::Missing(p.to_path_buf()))?;
    if meta.is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|err| DataError::Read {
            path: p.to_path_buf(),
            err,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|e| !e.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    entries.sort();
    for e in entries {
        files_under(&e, out)?;
    }
    Ok(())
}

impl Corpus {
    /// Reads and tokenizes `paths` (files, or directories read recursively in name
    /// order). Documents are separated by the tokenizer's (lowest) EOS token, if it has one.
    pub fn load(paths: &[PathBuf], tok: &Tok) -> Result<Self, DataError> {
        let mut files = Vec::new();
        for p in paths {
            let before = files.len();
            files_under(p, &mut files)?;
            if files.len() == before {
                return Err(DataError::Empty(p.clone()));
            }
        }
        let sep = tok.eos_ids.iter().min().copied();
        let mut tokens = Vec::new();
        for f in &files {
            let bytes = std::fs::read(f).map_err(|err| DataError::Read { path: f.clone(), err })?;
            let text = String::from_utf8(bytes).map_err(|_| DataError::NotText(f.clone()))?;
            let ids = tok.encode(&text, false).map_err(|e| DataError::Tokenize {
                path: f.clone(),
                err: e.to_string(),
            })?;
            if !tokens.is_empty() {
                tokens.extend(sep);
            }
            tokens.extend(ids);
        }
        Ok(Corpus { tokens, files })
    }
}

/// Non-overlapping windows of `seq_len + 1` tokens, consecutive windows sharing one token
/// (the last target of one is the first input of the next), so every token after the
/// first is predicted exactly once. A tail shorter than a window is dropped.
pub fn pack_windows(tokens: &[u32], seq_len: usize) -> Result<Vec<Vec<u32>>, DataError> {
    if seq_len == 0 {
        return Err(DataError::ZeroSeqLen);
    }
    if tokens.len() < seq_len + 1 {
        return Err(DataError::TooShort {
            tokens: tokens.len(),
            seq_len,
        });
    }
    Ok((0..(tokens.len() - 1) / seq_len)
        .map(|w| tokens[w * seq_len..w * seq_len + seq_len + 1].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_share_one_token_and_cover_every_target_once() {
        let t: Vec<u32> = (0..10).collect();
        let w = pack_windows(&t, 3).unwrap();
        assert_eq!(w, vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6], vec![6, 7, 8, 9]]);
        let w = pack_windows(&t, 4).unwrap();
        assert_eq!(w, vec![vec![0, 1, 2, 3, 4], vec![4, 5, 6, 7, 8]]);
        assert!(matches!(
            pack_windows(&t, 10),
            Err(DataError::TooShort {
                tokens: 10,
                seq_len: 10
            })
        ));
        assert!(matches!(pack_windows(&t, 0), Err(DataError::ZeroSeqLen)));
    }
}
