//! `crosskv serve`: the server's flags, and wiring it together: the runtime, the HTTP
//! and gRPC listeners, starting the engine once the port is bound, and shutdown.

use super::{check_block_size, ModelArgs};
use crate::units::parse_size;
use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Also serve the gRPC API on this port (off when absent).
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// KV cache budget, e.g. 4GiB (CPU default: 1GiB).
    #[arg(long, value_parser = parse_size, conflicts_with_all = ["kv_cache_tokens", "gpu_memory_utilization"])]
    pub kv_cache_memory: Option<u64>,
    /// KV cache budget as enough blocks for N tokens in every KV slot.
    #[arg(long, conflicts_with = "gpu_memory_utilization")]
    pub kv_cache_tokens: Option<usize>,
    /// GPU only: the fraction of the device's total memory this process may use; the KV
    /// cache gets it less the weights and a profiled forward's peak (GPU default 0.9).
    #[arg(long)]
    pub gpu_memory_utilization: Option<f64>,
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Longest prompt + completion (default: the model's max_position_embeddings).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Requests admitted (running + waiting) before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queued_requests: usize,
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// CUDA graphs: launch the next decode step while the device still runs this one,
    /// its tokens taken from this one's picks on the device (async scheduling).
    #[arg(long)]
    pub async_scheduling: bool,
    /// Require `Authorization: Bearer KEY` (not on /health and /metrics).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients use (default: the --model value, else the default model's repo id).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest accepted request body, e.g. 32MiB.
    #[arg(long, default_value = "32MiB", value_parser = parse_size)]
    pub max_request_body: u64,
    /// Seconds a request may take before its response starts (a stream then runs on).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Longest prompt text accepted (a chat request: its messages together), e.g. 1MiB;
    /// longer is refused with 400 before tokenizing (default: max-model-len × 64 bytes).
    #[arg(long, value_parser = parse_size)]
    pub max_prompt_bytes: Option<u64>,
    /// The tool-call format read from chat outputs for `tool_choice: "auto"`: auto (the
    /// one the model's chat template writes), hermes, llama3, mistral or none.
    #[arg(long, default_value = "auto")]
    pub tool_call_parser: crate::api::tool_calls::ToolCallParser,
    /// Open HTTP connections at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a request's headers may take to arrive, from their first byte.
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout: u64,
    /// Seconds an HTTP connection may sit idle (no request in flight) before it is closed.
    #[arg(long, default_value_t = 60)]
    pub keep_alive_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM / Ctrl-C before they are aborted.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Loads the model and starts the engine (blocking: run it off the async threads).
fn start_engine(args: &ServeArgs) -> anyhow::Result<crate::engine::EngineHandle> {
    use crate::engine::{EngineConfig, EngineHandle};
    check_block_size(args.block_size)?;
    if let Some(f) = args.gpu_memory_utilization {
        if args.model.device != "cuda" && !args.model.device.starts_with("cuda:") {
            bail!("--gpu-memory-utilization needs a GPU device; on CPU give --kv-cache-memory or --kv-cache-tokens");
        }
        if !(f > 0.0 && f <= 1.0) {
            bail!("--gpu-memory-utilization {f}: expected a fraction in (0, 1]");
        }
    }
    if args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 || args.max_queued_requests == 0 {
        bail!("--max-num-seqs, --max-num-batched-tokens and --max-queued-requests must be at least 1");
    }
    let loaded = args.model.load()?;
    let model_max = loaded.model.config().max_position_embeddings;
    let max_model_len = args.max_model_len.unwrap_or(model_max);
    if max_model_len == 0 || max_model_len > model_max {
        bail!("--max-model-len {max_model_len}: expected 1..={model_max} (the model's max_position_embeddings)");
    }
    let layout = loaded.model.layout().clone();
    let kv_cache_bytes = match (args.kv_cache_memory, args.kv_cache_tokens) {
        (Some(b), _) => b,
        (None, Some(t)) => layout.bytes_for_tokens(t, args.block_size),
        (None, None) if loaded.model.device().is_cuda() => crate::runner::memory::gpu_kv_budget(
            &std::iter::once(loaded.model.clone())
                .chain(loaded.peers.iter().cloned())
                .collect::<Vec<_>>(),
            args.gpu_memory_utilization.unwrap_or(0.9),
            args.block_size,
            args.max_num_batched_tokens
                .min(max_model_len.max(1) * args.max_num_seqs),
        )?,
        (None, None) => 1 << 30,
    };
    let config = EngineConfig {
        kv_cache_bytes,
        block_size: args.block_size,
        max_model_len,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_queued_requests: args.max_queued_requests,
        prefix_caching: !args.no_prefix_caching,
        cuda_graphs: !args.model.enforce_eager,
        async_scheduling: args.async_scheduling,
    };
    let ranks = std::iter::once(loaded.model).chain(loaded.peers).collect();
    Ok(EngineHandle::start_ranks(ranks, loaded.tokenizer, config)?)
}

/// `crosskv serve`: binds the port first (`/health` is 503 while the model loads), then
/// loads the model, starts the engine and serves until SIGTERM / Ctrl-C.
pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    use crate::api::http::{self, AppState, HttpConfig};
    if args.max_connections == 0 || args.header_read_timeout == 0 || args.keep_alive_timeout == 0 {
        bail!("--max-connections, --header-read-timeout and --keep-alive-timeout must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!("crosskv: listening on http://{}", listener.local_addr()?);
        let name = args.served_model_name.clone().unwrap_or_else(|| {
            args.model
                .model
                .clone()
                .unwrap_or_else(|| crate::model::source::DEFAULT_REPO.to_string())
        });
        let state = AppState::loading(HttpConfig {
            served_model_name: name,
            api_key: args.api_key.clone(),
            max_body_bytes: usize::try_from(args.max_request_body).unwrap_or(usize::MAX),
            request_timeout: std::time::Duration::from_secs(args.request_timeout),
            max_prompt_bytes: args.max_prompt_bytes.map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
            tool_call_parser: args.tool_call_parser,
        });
        let limits = crate::api::listener::ConnectionLimits {
            max_connections: args.max_connections,
            header_read_timeout: std::time::Duration::from_secs(args.header_read_timeout),
            keep_alive_timeout: std::time::Duration::from_secs(args.keep_alive_timeout),
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let until = stopped();
        let server = tokio::spawn(http::serve(listener, state.clone(), limits.clone(), until));
        let signal = tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!("crosskv: shutting down");
            let _ = stop_tx.send(true);
        });
        let a = args.clone();
        let handle = tokio::select! {
            h = tokio::task::spawn_blocking(move || start_engine(&a)) => h??,
            _ = stopped() => return Ok(()),
        };
        state.set_ready(handle.clone());
        eprintln!("crosskv: ready");
        if let Some(port) = args.grpc_port {
            let addr: std::net::SocketAddr = format!("{}:{port}", args.host)
                .parse()
                .with_context(|| format!("--host {} --grpc-port {port}", args.host))?;
            let h = handle.clone();
            let fut = stopped();
            let grpc = crate::api::grpc::GrpcConfig {
                api_key: args.api_key.clone(),
                max_prompt_bytes: args.max_prompt_bytes.map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
                connections: limits.clone(),
                tool_call_parser: args.tool_call_parser,
            };
            tokio::spawn(async move {
                if let Err(e) = crate::api::grpc::serve(h, grpc, addr, fut).await {
                    eprintln!("crosskv: gRPC server: {e:#}");
                }
            });
        }
        // After the signal: in-flight requests get the grace period, then are aborted.
        let grace = std::time::Duration::from_secs(args.shutdown_grace);
        let h = handle.clone();
        let fut = stopped();
        tokio::spawn(async move {
            fut.await;
            tokio::time::sleep(grace).await;
            let _ = tokio::task::spawn_blocking(move || h.shutdown()).await;
        });
        server.await??;
        signal.abort();
        tokio::task::spawn_blocking(move || handle.shutdown()).await?;
        Ok(())
    })
}
