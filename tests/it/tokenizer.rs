//! Tokenizers built from GGUF metadata: llama sentencepiece (byte-fallback BPE whose
//! merges come from the vocabulary's scores). The gpt2/SmolLM form is covered by the
//! default-model tests.

use candle_core::quantized::gguf_file::{self, Value as V};
use crosskv::model::Tok;

const PIECES: [&str; 20] = [
    "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "lo", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "ld",
    "▁world",
];

fn spm_gguf() -> gguf_file::Content {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let first_piece = tokens.len();
    for p in PIECES {
        tokens.push(p.to_string());
        types.push(1);
    }
    // Pieces listed earlier score higher, so they merge first (sentencepiece's ranks).
    let scores: Vec<V> = (0..tokens.len())
        .map(|i| V::F32(-(i.saturating_sub(first_piece) as f32)))
        .collect();
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("tokenizer.ggml.model", V::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.scores", V::Array(scores)),
        (
            "tokenizer.ggml.token_type",
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
        ("tokenizer.ggml.add_bos_token", V::Bool(true)),
    ];
    let refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    gguf_file::Content::read(&mut buf).unwrap()
}

fn id(piece: &str) -> u32 {
    3 + 256 + PIECES.iter().position(|p| *p == piece).unwrap() as u32
}

#[test]
fn sentencepiece_gguf_merges_by_score_and_prepends_bos() {
    let tok = Tok::from_gguf(&spm_gguf()).unwrap();
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![1, id("▁hello"), id("▁world")]
    );
    assert_eq!(tok.encode("hello", false).unwrap(), vec![id("▁hello")]);
    assert_eq!(tok.eos_ids.iter().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
}

#[test]
fn sentencepiece_gguf_falls_back_to_bytes_and_decodes_back() {
    let tok = Tok::from_gguf(&spm_gguf()).unwrap();
    // "é" is not in the vocabulary: its two UTF-8 bytes become byte tokens.
    let ids = tok.encode("hé", false).unwrap();
    assert_eq!(ids, vec![id("▁h"), 3 + 0xC3, 3 + 0xA9]);
    for text in ["hé", "hello world", "world hello  hello"] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}
