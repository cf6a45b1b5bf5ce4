//! The Helm chart and the plain manifests rendered from it (deploy/, docs/deployment.md):
//! `scripts/k8s-manifests.py check` lints the chart, checks that deploy/kubernetes/ is
//! its current default rendering, and validates the manifests of the defaults and of
//! every option against the Kubernetes API schemas. Skipped, saying so, where its
//! Python packages are not installed.

#[test]
fn helm_chart_lints_renders_the_committed_manifests_and_validates() {
    if !crate::common::python_imports(&["helm_python", "kubernetes_validate", "yaml"]) {
        eprintln!(
            "skipped: {} lacks helm-python-sdk, kubernetes-validate or pyyaml \
             (pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml)",
            crate::common::python()
        );
        return;
    }
    let out = std::process::Command::new(crate::common::python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/k8s-manifests.py"))
        .arg("check")
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("every option: flags, GPU count"), "{text}");
}
