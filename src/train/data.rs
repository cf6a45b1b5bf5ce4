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

/// The order training draws windows in: a shuffle seeded by `seed`, reshuffled (same
/// generator) each time a pass over the `n` windows ends. Its position, `(epoch, next)`,
/// is all a checkpoint needs to have the same windows come next after a resume.
pub struct DataOrder {
    rng: rand::rngs::StdRng,
    order: Vec<usize>,
    next: usize,
    epoch: usize,
}

impl DataOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        DataOrder {
            rng,
            order,
            next: 0,
            epoch: 0,
        }
    }

    /// The order at `(epoch, next)` (as [`DataOrder::position`] gave it): the passes before
    /// are replayed (shuffles only). `None` when `next` is beyond the `n` windows.
    pub fn at(n: usize, seed: u64, epoch: usize, next: usize) -> Option<Self> {
        if next > n || (n == 0 && epoch > 0) {
            return None;
        }
        let mut o = DataOrder::new(n, seed);
        for _ in 0..epoch {
            o.reshuffle();
        }
        o.next = next;
        Some(o)
    }

    fn reshuffle(&mut self) {
        use rand::seq::SliceRandom;
        self.order.shuffle(&mut self.rng);
        self.next = 0;
        self.epoch += 1;
    }

    /// The next window's index.
    pub fn next_index(&mut self) -> usize {
        if self.next == self.order.len() {
            self.reshuffle();
        }
        self.next += 1;
        self.order[self.next - 1]
    }

    /// `(epoch, windows drawn in this epoch)`.
    pub fn position(&self) -> (usize, usize) {
        (self.epoch, self.next)
    }
}

/// FNV-1a over the windows' tokens (and their lengths): a resumed run checks it gets
/// the same training windows.
pub fn fingerprint(windows: &[Vec<u32>]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u32| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for w in windows {
        eat(w.len() as u32);
        w.iter().for_each(|&t| eat(t));
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_order_restarted_at_its_position_draws_the_same_windows() {
        let mut straight = DataOrder::new(5, 3);
        let first: Vec<usize> = (0..12).map(|_| straight.next_index()).collect();
        for (i, w) in first.chunks(5).take(2).enumerate() {
            let mut sorted = w.to_vec();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "pass {i} draws each window once");
        }
        let (epoch, next) = straight.position();
        assert_eq!((epoch, next), (2, 2));
        let mut resumed = DataOrder::at(5, 3, epoch, next).unwrap();
        let a: Vec<usize> = (0..11).map(|_| straight.next_index()).collect();
        let b: Vec<usize> = (0..11).map(|_| resumed.next_index()).collect();
        assert_eq!(a, b);
        // At the very end of a pass: the next draw reshuffles, in both.
        let mut s = DataOrder::new(4, 9);
        (0..4).for_each(|_| {
            s.next_index();
        });
        let mut r = DataOrder::at(4, 9, 0, 4).unwrap();
        assert_eq!(
            (0..6).map(|_| s.next_index()).collect::<Vec<_>>(),
            (0..6).map(|_| r.next_index()).collect::<Vec<_>>()
        );
        assert!(DataOrder::at(4, 9, 0, 5).is_none());
    }

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
