//! Per-request output text: incremental detokenization and stop strings, which are
//! matched across token boundaries and never sent. Text that could still be the start
//! of a stop string is held back until it can't.

use crate::model::{StreamDecoder, Tok};

#[derive(Debug, Default)]
pub struct OutputText {
    decoder: StreamDecoder,
    stop: Vec<String>,
    /// All decoded text, and how much of it was sent.
    text: String,
    sent: usize,
}

impl OutputText {
    pub fn new(stop: Vec<String>) -> Self {
        OutputText {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds a token; returns the text now safe to send, and whether a stop string ended
    /// the output (the text before it is included, the stop string is not).
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<(String, bool), crate::model::tokenizer::TokenizerError> {
        if let Some(piece) = self.decoder.push(tok, id)? {
            self.text.push_str(&piece);
        }
        // A stop string can only start where it could still overlap unsent text.
        let longest = self.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        if let Some(end) = hit {
            let out = self.text[self.sent.min(end)..end].to_string();
            self.sent = self.text.len();
            return Ok((out, true));
        }
        let mut safe = self.text.len() - self.held_back();
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let safe = safe.max(self.sent);
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        Ok((out, false))
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if k > best && s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }

    /// The text still held back, sent when the request ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}
