//! Build steps, one function per job. Nothing here needs CUDA or a system `protoc`:
//! the gRPC code is generated with the `protoc` binary that `protoc-bin-vendored`
//! ships. Feature-gated jobs (e.g. CUDA kernels under `cuda`) go in their own
//! function, called from `main` behind `CARGO_FEATURE_*`.

fn main() {
    if let Err(e) = grpc() {
        panic!("generating the gRPC code from proto/crosskv.proto: {e}");
    }
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
        .compile_protos(&[PROTO], &["proto"])?;
    Ok(())
}
