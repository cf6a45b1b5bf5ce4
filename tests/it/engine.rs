//! The engine thread end to end with a tiny random model and the default model's
//! real tokenizer: events, stop conditions, aborts, preemption and prefix caching.

use crate::common::Tiny;
use candle_core::quantized::gguf_file;
use crosskv::engine::{EngineConfig, EngineEvent, EngineHandle, FinishReason, GenerateOptions, GenerateRequest};
use crosskv::model::{resolve_source, ModelSource, Tok};
use crosskv::runner::SamplingParams;

const VOCAB: usize = 49152;

fn tokenizer() -> Tok {
    let ModelSource::Gguf(path) = resolve_source(None).expect("default model") else {
        panic!("the default model is a GGUF here")
    };
    let mut f = std::fs::File::open(path).unwrap();
    Tok::from_gguf(&gguf_file::Content::read(&mut f).unwrap()).unwrap()
}

struct TestEngine {
    handle: EngineHandle,
    _dir: crate::common::Checkpoint,
}

fn engine(kv_tokens: usize, max_num_seqs: usize, budget: usize) -> TestEngine {
    let ckpt = Tiny::new(2, 4, 2, 8, 32, VOCAB).seed(42).write();
    let model = ckpt.load();
    let layout = model.layout().clone();
    let block_bytes = layout.block_bytes(4) as u64;
    let kv_cache_bytes = kv_tokens.div_ceil(4) as u64 * layout.kv_layers() as u64 * block_bytes;
    let config = EngineConfig {
        kv_cache_bytes,
        block_size: 4,
        max_model_len: kv_tokens.min(128),
        max_num_seqs,
        max_num_batched_tokens: budget,
        max_queued_requests: 64,
        prefix_caching: true,
        cuda_graphs: false,
        async_scheduling: false,
    };
    TestEngine {
        handle: EngineHandle::start(model, tokenizer(), config).unwrap(),
        _dir: ckpt,
    }
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Collects a request's events: generated ids, text, finish reason.
fn collect(stream: &mut crosskv::engine::RequestStream) -> (Vec<u32>, String, FinishReason) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    loop {
        match stream.blocking_next().expect("a request ends with Finished") {
            EngineEvent::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            EngineEvent::Finished { reason, .. } => return (ids, text, reason),
            EngineEvent::Error(e) => panic!("engine error: {e}"),
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
}

fn run(h: &EngineHandle, prompt: &[u32], o: GenerateOptions) -> (Vec<u32>, String, FinishReason) {
    let mut s = h
        .submit(GenerateRequest {
            prompt_ids: prompt.to_vec(),
            options: o,
        })
        .unwrap();
    collect(&mut s)
}

fn wait_for_free_blocks(h: &EngineHandle) -> usize {
    for _ in 0..200 {
        let s = h.status();
        if s.blocks_used == 0 && s.num_running == 0 && s.num_waiting == 0 {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    h.status().blocks_used
}

#[test]
fn a_request_streams_max_tokens_tokens_and_frees_its_blocks() {
    let e = engine(256, 8, 64);
    let (ids, text, reason) = run(&e.handle, &[10, 20, 30, 40, 50], greedy(7));
    assert_eq!(ids.len(), 7);
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(text, e.handle.tokenizer().decode(&ids, true).unwrap());
    assert_eq!(wait_for_free_blocks(&e.handle), 0);
    e.handle.shutdown();
}

#[test]
fn stop_strings_end_the_output_before_them_even_across_tokens() {
    let e = engine(256, 8, 64);
    let prompt = [5, 6, 7, 8, 9];
    let (_, full, _) = run(&e.handle, &prompt, greedy(12));
    // A stop string that starts inside one token's text and ends in a later one.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 8, "need some text: {full:?}");
    let (a, b) = (chars[3].0, chars[7].0);
    let stop = full[a..b].to_string();
    let first = full.find(&stop).unwrap();
    let o = GenerateOptions {
        stop: vec![stop.clone()],
        ..greedy(12)
    };
    let (_, text, reason) = run(&e.handle, &prompt, o);
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(text, full[..first], "output stops right before {stop:?}");
    e.handle.shutdown();
}

#[test]
fn a_stop_string_ends_the_stream_and_frees_the_request_while_the_stream_is_still_held() {
    let e = engine(256, 8, 64);
    let prompt = [5, 6, 7, 8, 9];
    let (ids, full, _) = run(&e.handle, &prompt, greedy(24));
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 8, "need some text: {full:?}");
    let stop = full[chars[4].0..chars[6].0].to_string();
    let mut s = e
        .handle
        .submit(GenerateRequest {
            prompt_ids: prompt.to_vec(),
            options: GenerateOptions {
                stop: vec![stop.clone()],
                ..greedy(24)
            },
        })
        .unwrap();
    let mut got = Vec::new();
    let usage = loop {
        match s.blocking_next().expect("a Finished event") {
            EngineEvent::Token { id, .. } => got.push(id),
            EngineEvent::Finished { reason, usage } => {
                assert_eq!(reason, FinishReason::Stop);
                break usage;
            }
            EngineEvent::Error(e) => panic!("engine error: {e}"),
            EngineEvent::PromptLogprobs(_) => {}
        }
    };
    // The tokens up to the one that completed the stop string, the same as the run
    // without it, and counted as the usage.
    assert!(got.len() < ids.len(), "the stop string ended the output early");
    assert_eq!(got, ids[..got.len()]);
    assert_eq!(usage.completion_tokens, got.len());
    assert_eq!(usage.prompt_tokens, prompt.len());
    // Nothing follows, and the engine let go of the request without the stream being
    // dropped.
    assert!(s.blocking_next().is_none());
    assert_eq!(wait_for_free_blocks(&e.handle), 0);
    drop(s);
    e.handle.shutdown();
}

#[test]
fn stop_token_ids_and_min_tokens() {
    let e = engine(256, 8, 64);
    let prompt = [100, 200, 300];
    let (ids, _, _) = run(&e.handle, &prompt, greedy(10));
    let o = GenerateOptions {
        stop_token_ids: vec![ids[2]],
        ..greedy(10)
    };
    let (got, _, reason) = run(&e.handle, &prompt, o);
    assert_eq!((got.len(), reason), (3, FinishReason::Stop));
    // min_tokens: the stop token cannot be picked before 5 tokens.
    let o = GenerateOptions {
        stop_token_ids: vec![ids[2]],
        min_tokens: 5,
        ..greedy(10)
    };
    let (got, _, _) = run(&e.handle, &prompt, o);
    assert!(got.len() >= 5);
    assert!(!got[..5].contains(&ids[2]));
    e.handle.shutdown();
}

#[test]
fn dropping_the_stream_aborts_the_request_and_frees_its_blocks() {
    let e = engine(256, 8, 64);
    let mut s = e
        .handle
        .submit(GenerateRequest {
            prompt_ids: vec![1, 2, 3, 4, 5, 6],
            options: greedy(100),
        })
        .unwrap();
    // Wait for the first token, then walk away.
    loop {
        if let Some(EngineEvent::Token { .. }) = s.blocking_next() {
            break;
        }
    }
    drop(s);
    assert_eq!(wait_for_free_blocks(&e.handle), 0);
    e.handle.shutdown();
}

#[test]
fn concurrent_requests_give_the_same_output_as_alone_even_under_preemption() {
    // Room for about two requests at a time: the rest queue or get preempted.
    let e = engine(48, 16, 64);
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| (0..6).map(|j| 1000 + 37 * i + 11 * j).collect())
        .collect();
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| run(&e.handle, p, greedy(14)).0).collect();
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            e.handle
                .submit(GenerateRequest {
                    prompt_ids: p.clone(),
                    options: greedy(14),
                })
                .unwrap()
        })
        .collect();
    let together: Vec<Vec<u32>> = streams.into_iter().map(|mut s| collect(&mut s).0).collect();
    assert_eq!(together, alone);
    let preemptions = e.handle.metrics().num_preemptions_total.get();
    assert!(preemptions > 0, "the budget was meant to force preemption");
    assert_eq!(wait_for_free_blocks(&e.handle), 0);
    e.handle.shutdown();
}

#[test]
fn seeded_sampling_is_reproducible_across_batches() {
    let e = engine(512, 8, 64);
    let o = |seed| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed),
            ..Default::default()
        },
        ..greedy(10)
    };
    let a = run(&e.handle, &[9, 8, 7], o(3)).0;
    let streams: Vec<_> = [3, 4, 3]
        .iter()
        .map(|&seed| {
            e.handle
                .submit(GenerateRequest {
                    prompt_ids: vec![9, 8, 7],
                    options: o(seed),
                })
                .unwrap()
        })
        .collect();
    let outs: Vec<Vec<u32>> = streams.into_iter().map(|mut s| collect(&mut s).0).collect();
    assert_eq!(outs[0], a);
    assert_eq!(outs[2], a);
    e.handle.shutdown();
}

#[test]
fn a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_output() {
    let e = engine(256, 8, 64);
    let prompt: Vec<u32> = (0..13).map(|i| 300 + i).collect();
    let first = run(&e.handle, &prompt, greedy(5));
    let mut s = e
        .handle
        .submit(GenerateRequest {
            prompt_ids: prompt.clone(),
            options: greedy(5),
        })
        .unwrap();
    let mut cached = 0;
    let mut ids = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::Token { id, .. } => ids.push(id),
            EngineEvent::Finished { usage, .. } => {
                cached = usage.cached_tokens;
                break;
            }
            _ => {}
        }
    }
    assert_eq!(ids, first.0);
    assert_eq!(cached, 12, "three full blocks of the 13-token prompt");
    assert!(e.handle.metrics().prefix_cache_hits_total.get() >= 12);
    e.handle.shutdown();
}

#[test]
fn prompt_logprobs_match_a_full_forward() {
    let ckpt = Tiny::new(2, 4, 2, 8, 32, VOCAB).seed(42).write();
    let reference = ckpt.load();
    let e = engine(256, 8, 64);
    let prompt: Vec<u32> = vec![11, 22, 33, 44, 55, 66, 77];
    let dense: Vec<Vec<f32>> = reference.forward_dense(&prompt).unwrap().to_vec2().unwrap();
    let o = GenerateOptions {
        prompt_logprobs: Some(2),
        ..greedy(1)
    };
    let mut s = e
        .handle
        .submit(GenerateRequest {
            prompt_ids: prompt.clone(),
            options: o,
        })
        .unwrap();
    let lps = loop {
        match s.blocking_next().unwrap() {
            EngineEvent::PromptLogprobs(l) => break l,
            EngineEvent::Error(e) => panic!("{e}"),
            _ => {}
        }
    };
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_none());
    for p in 1..prompt.len() {
        let lp = lps[p].as_ref().unwrap();
        let want = crosskv::engine::token_logprob(&dense[p - 1], prompt[p], 2);
        assert_eq!(lp.token, prompt[p]);
        assert!(
            (lp.logprob - want.logprob).abs() < 1e-4,
            "position {p}: {} vs {}",
            lp.logprob,
            want.logprob
        );
        assert_eq!(lp.top.len(), 2);
        assert_eq!(lp.top[0].0, want.top[0].0);
    }
    e.handle.shutdown();
}

/// Async scheduling on CUDA (a decode step launched before the previous one's picks
/// are read) gives every request the tokens of the synchronous engine: requests of
/// different lengths ending by length and by a stop token (a step launched past the
/// end, whose row is dropped), one aborted mid-way, two sampled on the device, and a
/// KV budget that forces preemption. Every block comes back. f32, so the picks do not hang on rounding.
#[cfg(feature = "cuda")]
#[test]
fn cuda_async_scheduling_gives_the_tokens_of_the_synchronous_engine() {
    let ckpt = Tiny::new(4, 4, 2, 64, 128, VOCAB)
        .cla("cla_share_factor", serde_json::json!(2))
        .max_positions(256)
        .seed(9)
        .write();
    // 40 blocks of 16 per slot: the 8 requests at their longest need 48.
    let start = |async_scheduling: bool| start_cuda_engine(&ckpt, 40, 512, async_scheduling);
    let mut rng = crate::common::Rng::new(5);
    let mut prompts: Vec<Vec<u32>> = (0..8).map(|i| rng.tokens(5 + 6 * i, VOCAB)).collect();
    // Request 3 repeats request 2's prompt, so its greedy tokens are request 2's and its
    // stop token, taken from them, is met by the 18th token at the latest.
    prompts[3] = prompts[2].clone();
    let max_tokens = [6, 9, 40, 40, 33, 40, 12, 40];
    // A stop token for request 3: a token the synchronous engine gives request 2.
    let reference = start(false);
    let (probe, _, _) = run(&reference, &prompts[2], greedy(40));
    let stop_token = probe[17];
    // Requests 6 and 7 sample on the device: seeded, one with a logit bias (carried
    // into launched steps), one with a penalty (never carried: its pick reads the token
    // before).
    let sampling = |i: usize| match i {
        6 => SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            seed: Some(6),
            logit_bias: vec![(5, 2.0)],
            ..Default::default()
        },
        7 => SamplingParams {
            temperature: 1.0,
            top_k: 20,
            seed: Some(7),
            repetition_penalty: 1.1,
            ..Default::default()
        },
        _ => SamplingParams::default(),
    };
    let options = |i: usize| GenerateOptions {
        stop_token_ids: if i == 3 { vec![stop_token] } else { Vec::new() },
        sampling: sampling(i),
        ..greedy(max_tokens[i])
    };
    let serve = |h: &EngineHandle| -> Vec<(Vec<u32>, FinishReason)> {
        let streams: Vec<_> = (0..8)
            .map(|i| {
                h.submit(GenerateRequest {
                    prompt_ids: prompts[i].clone(),
                    options: options(i),
                })
                .unwrap()
            })
            .collect();
        let outs = std::thread::scope(|s| {
            let joins: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, mut st)| {
                    s.spawn(move || {
                        if i == 5 {
                            // Aborted after 4 tokens: the stream is dropped.
                            let mut ids = Vec::new();
                            while ids.len() < 4 {
                                match st.blocking_next() {
                                    Some(EngineEvent::Token { id, .. }) => ids.push(id),
                                    Some(EngineEvent::Finished { reason, .. }) => return (ids, reason),
                                    other => panic!("request 5: {other:?}"),
                                }
                            }
                            return (ids, FinishReason::Abort);
                        }
                        let (ids, _, reason) = collect(&mut st);
                        (ids, reason)
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect::<Vec<_>>()
        });
        assert_eq!(wait_for_free_blocks(h), 0, "every block comes back");
        outs
    };
    let want = serve(&reference);
    reference.shutdown();
    let overlapped = start(true);
    // The same history as the reference's (its prefix cache holds this run too).
    assert_eq!(run(&overlapped, &prompts[2], greedy(40)).0, probe);
    let got = serve(&overlapped);
    overlapped.shutdown();
    for (i, ((w, wr), (g, gr))) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "request {i}: tokens");
        assert_eq!(gr, wr, "request {i}: finish reason");
    }
    assert_eq!(want[3].1, FinishReason::Stop, "request 3 ends on its stop token");
    assert!(want[3].0.len() <= 18);
    assert_eq!(want[2].0.len(), 40);
}

/// A CUDA engine (f32, decode graphs) over a tiny random model made with `seed` (head
/// dim 64, the smallest the CUDA kernels take): room for 64 blocks of 16 per slot. The
/// checkpoint lives as long as the handle is used.
#[cfg(feature = "cuda")]
fn cuda_engine(seed: u64, async_scheduling: bool) -> (EngineHandle, crate::common::Checkpoint) {
    let ckpt = Tiny::new(2, 4, 2, 64, 128, VOCAB).max_positions(128).seed(seed).write();
    (start_cuda_engine(&ckpt, 64, 256, async_scheduling), ckpt)
}

/// A CUDA engine (f32, decode graphs, blocks of 16, up to 16 sequences of 128 tokens)
/// over `ckpt`, with room for `blocks` blocks per KV slot.
#[cfg(feature = "cuda")]
fn start_cuda_engine(
    ckpt: &crate::common::Checkpoint,
    blocks: u64,
    max_num_batched_tokens: usize,
    async_scheduling: bool,
) -> EngineHandle {
    use crosskv::model::LoadOptions;
    let model = ckpt.load_with(&LoadOptions {
        dtype: Some(candle_core::DType::F32),
        device: crosskv::device::cuda(0).expect("a CUDA device"),
        ..Default::default()
    });
    let layout = model.layout().clone();
    let config = EngineConfig {
        kv_cache_bytes: blocks * layout.kv_layers() as u64 * layout.block_bytes(16) as u64,
        block_size: 16,
        max_model_len: 128,
        max_num_seqs: 16,
        max_num_batched_tokens,
        max_queued_requests: 64,
        prefix_caching: true,
        cuda_graphs: true,
        async_scheduling,
    };
    EngineHandle::start(model, tokenizer(), config).unwrap()
}

/// Sampling on the device (CUDA): seeded requests repeat their tokens, two requests of
/// one prompt and seed in one batch agree, a logit bias forces its token, and min_tokens
/// holds a stop token back until it is met.
#[cfg(feature = "cuda")]
#[test]
fn cuda_device_sampling_is_seeded_and_honours_bias_penalties_and_min_tokens() {
    let (h, _ckpt) = cuda_engine(21, false);
    let sampled = |seed: u64| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: Some(seed),
            repetition_penalty: 1.2,
            ..Default::default()
        },
        ..greedy(16)
    };
    let batch = |opts: Vec<GenerateOptions>| -> Vec<(Vec<u32>, FinishReason)> {
        let streams: Vec<_> = opts
            .into_iter()
            .map(|o| {
                h.submit(GenerateRequest {
                    prompt_ids: vec![11, 12, 13, 14],
                    options: o,
                })
                .unwrap()
            })
            .collect();
        streams
            .into_iter()
            .map(|mut s| {
                let (ids, _, r) = collect(&mut s);
                (ids, r)
            })
            .collect()
    };
    let a = batch(vec![sampled(3), sampled(4), sampled(3)]);
    assert_eq!(a[0], a[2], "one prompt, one seed, one batch: one answer");
    assert_ne!(a[0].0, a[1].0, "another seed, another answer");
    assert_eq!(
        batch(vec![sampled(3), sampled(4), sampled(3)]),
        a,
        "a repeated batch repeats"
    );
    let distinct: std::collections::HashSet<_> = a[0].0.iter().collect();
    assert!(distinct.len() > 3, "temperature 1 samples: {:?}", a[0].0);
    let forced = 777u32;
    let biased = |min_tokens: usize, stop: bool| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            logit_bias: vec![(forced, 100.0)],
            ..Default::default()
        },
        min_tokens,
        stop_token_ids: if stop { vec![forced] } else { Vec::new() },
        ..greedy(12)
    };
    let b = batch(vec![biased(0, false), biased(5, true), sampled(9)]);
    assert_eq!(
        b[0],
        (vec![forced; 12], FinishReason::Length),
        "the bias forces its token"
    );
    assert_eq!(b[1].1, FinishReason::Stop);
    assert_eq!(b[1].0.len(), 6, "held back for 5 tokens, then met: {:?}", b[1].0);
    assert!(b[1].0[..5].iter().all(|&t| t != forced));
    assert_eq!(b[1].0[5], forced);
    assert_eq!(wait_for_free_blocks(&h), 0);
    h.shutdown();
}

/// Structured outputs beside sampling on the device (CUDA, async scheduling on): a
/// constrained request is never sampled on the device nor launched ahead of its
/// mask, so its text follows its constraint, sampled or greedy, while the sampled
/// requests batched with it are picked on the device and carried ahead. Every block
/// comes back.
#[cfg(feature = "cuda")]
#[test]
fn cuda_constrained_requests_are_masked_beside_device_sampling() {
    use crosskv::engine::Constraint;
    let (h, _ckpt) = cuda_engine(23, true);
    let sampled = |seed: u64| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            seed: Some(seed),
            ..Default::default()
        },
        ..greedy(24)
    };
    let word = regex::Regex::new("^[a-z]{8}$").unwrap();
    let choices = ["alpha", "beta", "gamma"].map(String::from);
    let constrained = |o: GenerateOptions, c: Constraint| GenerateOptions {
        constraint: Some(c),
        ..o
    };
    let opts = vec![
        sampled(1),
        constrained(sampled(2), Constraint::Regex("[a-z]{8}".into())),
        sampled(3),
        constrained(sampled(4), Constraint::Choice(choices.to_vec())),
        constrained(greedy(24), Constraint::Regex("[a-z]{8}".into())),
    ];
    let streams: Vec<_> = opts
        .into_iter()
        .map(|o| {
            h.submit(GenerateRequest {
                prompt_ids: vec![11, 12, 13, 14],
                options: o,
            })
            .unwrap()
        })
        .collect();
    let out: Vec<_> = streams.into_iter().map(|mut s| collect(&mut s)).collect();
    for i in [0, 2] {
        assert_eq!(out[i].0.len(), 24, "request {i}");
        assert_eq!(out[i].2, FinishReason::Length);
    }
    for i in [1, 4] {
        assert!(word.is_match(&out[i].1), "request {i}: {:?}", out[i].1);
        assert_eq!(out[i].2, FinishReason::Stop, "request {i}");
    }
    assert!(choices.contains(&out[3].1), "{:?}", out[3].1);
    assert_eq!(out[3].2, FinishReason::Stop);
    assert_eq!(wait_for_free_blocks(&h), 0);
    h.shutdown();
}
