//! `crosskv convert`: the flags of a checkpoint rewrite (`crate::convert` does it).

use super::SharingArgs;
use crate::model;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A HF safetensors directory or repo id, or a GGUF file (exported to a HF
    /// directory: dequantized to f32, re-shared only when asked); absent: the embedded
    /// default model (GGUF).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub sharing: SharingArgs,
    /// How each re-shared producer's K/V projections start: its own (`first`), or the
    /// mean of those of the layers that will read its cache (`mean`).
    #[arg(long, value_enum, default_value = "first")]
    pub kv_init: crate::model::reshare::KvInit,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn convert(args: &ConvertArgs) -> anyhow::Result<()> {
    let sharing = args.sharing.sharing()?;
    let source = model::resolve_source(args.model.as_deref())?;
    let (n, layers, kv_layers) = crate::convert::convert(source, sharing.as_ref(), args.kv_init, &args.out)?;
    println!(
        "wrote {} ({n} tensors; {layers} layers, {kv_layers} KV layers)",
        args.out.display()
    );
    Ok(())
}
