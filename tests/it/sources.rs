//! Resolving `--model`: directories, GGUF files, hub repo ids through a warm hf-hub
//! cache with no network, and clear errors for everything else.

use crosskv::model::{resolve_source, source::hub_snapshot, ModelSource};

/// Lays out `files` the way hf-hub caches a repo: refs/main → snapshots/<commit>/.
fn fake_hub_cache(root: &std::path::Path, repo: &str, files: &[&str]) -> std::path::PathBuf {
    let dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), commit).unwrap();
    let snap = dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in files {
        std::fs::write(snap.join(f), "{}").unwrap();
    }
    snap
}

#[test]
fn warm_hub_cache_resolves_offline_to_its_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    // An owner name that cannot exist on the hub: any network use would fail.
    let repo = "crosskv-test-owner/tiny-model";
    let snap = fake_hub_cache(
        tmp.path(),
        repo,
        &["config.json", "tokenizer.json", "model.safetensors"],
    );
    let cache = hf_hub::Cache::new(tmp.path().to_path_buf());
    assert_eq!(hub_snapshot(repo, &cache).unwrap(), ModelSource::Dir(snap));
}

#[test]
fn sharded_checkpoint_in_the_cache_needs_every_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = "crosskv-test-owner/sharded";
    let snap = fake_hub_cache(
        tmp.path(),
        repo,
        &["config.json", "tokenizer.json", "model-00001-of-00002.safetensors"],
    );
    let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(snap.join("model.safetensors.index.json"), index).unwrap();
    let cache = hf_hub::Cache::new(tmp.path().to_path_buf());
    // One shard missing: not usable offline, and the hub is unreachable here.
    assert!(hub_snapshot(repo, &cache).is_err());
    std::fs::write(snap.join("model-00002-of-00002.safetensors"), "{}").unwrap();
    assert_eq!(hub_snapshot(repo, &cache).unwrap(), ModelSource::Dir(snap));
}

#[test]
fn local_paths_resolve_by_kind_and_bad_ones_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    assert_eq!(
        resolve_source(Some(gguf.to_str().unwrap())).unwrap(),
        ModelSource::Gguf(gguf.clone())
    );
    // A directory without config.json is not a model.
    let e = resolve_source(Some(tmp.path().to_str().unwrap()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
    assert_eq!(
        resolve_source(Some(tmp.path().to_str().unwrap())).unwrap(),
        ModelSource::Dir(tmp.path().into())
    );
    let txt = tmp.path().join("notes.txt");
    std::fs::write(&txt, "x").unwrap();
    let e = resolve_source(Some(txt.to_str().unwrap())).unwrap_err().to_string();
    assert!(e.contains("notes.txt"), "{e}");
    let e = resolve_source(Some("/no/such/model/here")).unwrap_err().to_string();
    assert!(e.contains("no such file"), "{e}");
}
