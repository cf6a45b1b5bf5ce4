//! Per-request output text: incremental detokenization and stop strings, which are
//! matched across token boundaries and never sent. Text that could still be the start
//! of a stop string is held back until it can't.
//!
//! Matching is incremental: each stop string keeps a KMP state (how much of it the text
//! currently ends with), so a new byte costs amortised O(1) per stop string, whatever
//! the lengths of the output and of the stop strings. The output ends at the first stop
//! string to complete, so where it ends does not depend on how the text was split into
//! tokens.

use crate::model::{StreamDecoder, Tok};

/// One stop string and how much of it the text ends with.
#[derive(Debug)]
struct StopMatcher {
    pattern: Vec<u8>,
    /// KMP failure function: `fail[i]` is the longest proper prefix of
    /// `pattern[..=i]` that is also its suffix.
    fail: Vec<usize>,
    /// The longest prefix of `pattern` the text ends with (never all of it).
    matched: usize,
}

impl StopMatcher {
    fn new(pattern: &str) -> Self {
        let p = pattern.as_bytes();
        let mut fail = vec![0; p.len()];
        let mut k = 0;
        for i in 1..p.len() {
            while k > 0 && p[i] != p[k] {
                k = fail[k - 1];
            }
            if p[i] == p[k] {
                k += 1;
            }
            fail[i] = k;
        }
        StopMatcher {
            pattern: p.to_vec(),
            fail,
            matched: 0,
        }
    }

    /// Feeds the text's next byte; true when the text now ends with the whole pattern.
    fn push(&mut self, b: u8) -> bool {
        while self.matched > 0 && self.pattern[self.matched] != b {
            self.matched = self.fail[self.matched - 1];
        }
        if self.pattern[self.matched] == b {
            self.matched += 1;
        }
        if self.matched == self.pattern.len() {
            self.matched = self.fail[self.matched - 1];
            return true;
        }
        false
    }
}

#[derive(Debug, Default)]
pub struct OutputText {
    decoder: StreamDecoder,
    stop: Vec<StopMatcher>,
    /// All decoded text, and how much of it was sent.
    text: String,
    sent: usize,
}

impl OutputText {
    pub fn new(stop: Vec<String>) -> Self {
        OutputText {
            stop: stop
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| StopMatcher::new(s))
                .collect(),
            ..Default::default()
        }
    }

    /// Adds a token; returns the text now safe to send, and whether a stop string ended
    /// the output (the text before it is included, the stop string is not).
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<(String, bool), crate::model::tokenizer::TokenizerError> {
        let Some(piece) = self.decoder.push(tok, id)? else {
            return Ok((String::new(), false));
        };
        Ok(self.push_text(&piece))
    }

    /// `push` for text already decoded.
    fn push_text(&mut self, piece: &str) -> (String, bool) {
        let base = self.text.len();
        self.text.push_str(piece);
        for (i, &b) in piece.as_bytes().iter().enumerate() {
            let mut hit = None;
            for m in &mut self.stop {
                if m.push(b) && hit.is_none() {
                    hit = Some(m.pattern.len());
                }
            }
            if let Some(len) = hit {
                // Every byte of the stop string was held back as a possible start of it,
                // so it begins at or after `sent`, and on a char boundary (it is a str).
                let stop_start = base + i + 1 - len;
                let out = self.text[self.sent..stop_start].to_string();
                self.sent = self.text.len();
                return (out, true);
            }
        }
        let held = self.stop.iter().map(|m| m.matched).max().unwrap_or(0);
        let mut safe = self.text.len() - held;
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let safe = safe.max(self.sent);
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        (out, false)
    }

    /// The text still held back, sent when the request ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds pieces; returns (all text sent, whether a stop string ended it).
    fn run(stop: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut o = OutputText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut sent = String::new();
        for p in pieces {
            let (t, hit) = o.push_text(p);
            sent.push_str(&t);
            if hit {
                return (sent, true);
            }
        }
        sent.push_str(&o.flush());
        (sent, false)
    }

    #[test]
    fn a_stop_string_across_pieces_cuts_the_output_before_it() {
        assert_eq!(run(&["END"], &["abc E", "N", "D more"]), ("abc ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn a_possible_stop_start_is_held_back_and_flushed_when_it_is_not_one() {
        let mut o = OutputText::new(vec!["STOP".into()]);
        assert_eq!(o.push_text("xx ST"), ("xx ".into(), false));
        assert_eq!(o.push_text("O"), ("".into(), false));
        assert_eq!(o.push_text("RM"), ("STORM".into(), false));
        assert_eq!(o.push_text("ST"), ("".into(), false));
        assert_eq!(o.flush(), "ST");
    }

    #[test]
    fn overlapping_prefixes_are_found_as_kmp_finds_them() {
        // "aab" inside "aaab": a naive restart after the mismatch would miss it.
        assert_eq!(run(&["aab"], &["a", "a", "a", "b", "c"]), ("a".into(), true));
        assert_eq!(run(&["abab"], &["aba", "bab"]), ("".into(), true));
        assert_eq!(run(&["abab"], &["xaba", "bab"]), ("x".into(), true));
    }

    #[test]
    fn the_first_stop_string_to_complete_wins_however_the_text_is_split() {
        for pieces in [&["xabcd"][..], &["x", "a", "b", "c", "d"], &["xa", "bcd"]] {
            assert_eq!(run(&["abcd", "bc"], pieces), ("xa".into(), true), "{pieces:?}");
        }
    }

    #[test]
    fn multibyte_text_is_never_split_inside_a_character() {
        // The stop string shares its first bytes with the text's characters.
        assert_eq!(run(&["é!"], &["aé", "éb", "é!"]), ("aééb".into(), true));
        assert_eq!(run(&["\u{e9}\u{e8}"], &["\u{e9}", "x"]), ("\u{e9}x".into(), false));
        let mut o = OutputText::new(vec!["\u{e9}\u{e8}".into()]);
        // "é" could start the stop string: nothing of it may go out yet.
        assert_eq!(o.push_text("a\u{e9}"), ("a".into(), false));
    }

    #[test]
    fn long_nearly_matching_stop_strings_hold_back_only_their_matched_prefix() {
        let stops: Vec<String> = (0..16).map(|i| "a".repeat(1023) + &i.to_string()).collect();
        let mut o = OutputText::new(stops);
        let mut sent = 0;
        for _ in 0..2000 {
            let (t, hit) = o.push_text("aaaa");
            assert!(!hit);
            sent += t.len();
        }
        // 1,023 a's could still begin a stop string.
        assert_eq!(sent, 8000 - 1023);
        assert_eq!(o.flush().len(), 1023);
        assert_eq!(
            run(&[&("a".repeat(1023) + "7")], &[&"a".repeat(5000), "7"]).0.len(),
            5000 - 1023
        );
    }
}
