//! Build steps, one function per job. Nothing here needs CUDA or a system `protoc`:
//! the gRPC code is generated with the `protoc` binary that `protoc-bin-vendored`
//! ships. Feature-gated jobs (e.g. CUDA kernels under `cuda`) go in their own
//! function, called from `main` behind `CARGO_FEATURE_*`.

fn main() {
    if let Err(e) = grpc() {
        panic!("generating the gRPC code from proto/crosskv.proto: {e}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        if let Err(e) = cuda_kernels() {
            panic!("compiling kernels/*.cu to PTX: {e}");
        }
    }
}

/// `kernels/*.cu` → PTX for sm_90 (or `$CUDA_COMPUTE_CAP`), one
/// `pub const NAME: &str` per file in `$OUT_DIR/ptx.rs` (included by `src/ops/cuda/mod.rs`).
/// Only under `--features cuda`; needs `nvcc` (see docs/gpu.md).
#[cfg(feature = "cuda")]
fn cuda_kernels() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The shared headers (kernels/*.cuh) are part of every kernel's cache key.
    let mut headers: Vec<std::path::PathBuf> = std::fs::read_dir("kernels")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cuh"))
        .collect();
    headers.sort();
    let mut builder = cudaforge::KernelBuilder::new()
        .source_dir("kernels")
        .watch(headers)
        .arg("-O3")
        .arg("-std=c++17")
        .arg("--expt-relaxed-constexpr");
    if std::env::var_os("CUDA_COMPUTE_CAP").is_none() {
        builder = builder.compute_cap(90);
    }
    builder.build_ptx()?.write(out.join("ptx.rs"))?;
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda_kernels() -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}

/// `proto/crosskv.proto` → tonic server and client (included by `src/api/grpc.rs`).
fn grpc() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/crosskv.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // tonic-prost-build runs `protoc` from $PROTOC; build scripts are single-threaded.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::api::grpc_codec::StrictProstCodec")
        .compile_protos(&[PROTO], &["proto"])?;
    Ok(())
}
