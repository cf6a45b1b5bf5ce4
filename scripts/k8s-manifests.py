#!/usr/bin/env python3
"""The Helm chart (deploy/helm/crosskv) and the plain manifests rendered from it
(deploy/kubernetes/crosskv.yaml).

    python3 scripts/k8s-manifests.py render   # rewrite deploy/kubernetes/ from the chart
    python3 scripts/k8s-manifests.py check    # what CI runs (tests/it/deploy.rs)

Rendering is Helm's own template engine (Helm's Go SDK, through the PyPI package
helm-python-sdk), so no helm binary is needed. `check`:
  1. `helm lint --strict` of the chart;
  2. the default rendering equals deploy/kubernetes/crosskv.yaml (run `render` after
     changing the chart);
  3. every manifest of the default rendering, and of one with every option on (PVC,
     API key, gRPC, ServiceMonitor, autoscaling, tensor parallelism, the router), is checked by
     kubernetes-validate against the Kubernetes API schemas (strict: unknown fields are
     errors); the ServiceMonitor, a Prometheus Operator custom resource with no schema
     there, is checked for its shape here instead.

Needs: pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml
"""

import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "crosskv"
RENDERED = ROOT / "deploy" / "kubernetes" / "crosskv.yaml"
RELEASE = "crosskv"
NAMESPACE = "default"
KUBE_VERSION = "1.33"

HEADER = """\
# Rendered from deploy/helm/crosskv with its default values (release "crosskv",
# namespace "default") by scripts/k8s-manifests.py render; do not edit by hand.
"""

EVERY_OPTION = {
    "model": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "servedModelName": "smollm2",
    "tensorParallelSize": 2,
    "kvCacheMemory": "8GiB",
    "maxModelLen": 4096,
    "extraArgs": ["--max-num-seqs", "128"],
    "env": [{"name": "CROSSKV_LOG", "value": "info"}],
    "grpc": {"enabled": True},
    "apiKey": {"existingSecret": "crosskv-api-key"},
    "modelCache": {"persistentVolumeClaim": {"enabled": True, "storageClassName": "fast"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "autoscaling": {"enabled": True},
    "router": {"enabled": True, "image": {"repository": "registry.example/sglang-router", "tag": "0.3.2"}},
}


def render(values=None):
    """The chart's manifests as one YAML stream, templates in name order."""
    chart = helm.Chart.load(CHART)
    out = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for name in sorted(out):
        if not name.endswith(".yaml"):
            continue
        text = out[name].strip()
        if text:
            docs.append(f"# Source: {name}\n{text}\n")
    return "---\n".join(docs)


def check_service_monitor(doc):
    spec = doc["spec"]
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["apiVersion"]
    assert spec["selector"]["matchLabels"], "ServiceMonitor selects nothing"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval"}, ep
        assert ep["path"] == "/metrics" and ep["port"] == "http", ep


def validate(stream, what):
    docs = [d for d in yaml.safe_load_all(stream) if d]
    kinds = []
    for doc in docs:
        kinds.append(doc["kind"])
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            sys.exit(f"{what}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    print(f"{what}: {len(docs)} manifests valid for Kubernetes {KUBE_VERSION}: {', '.join(kinds)}")
    return docs


def check():
    lint = helm.lint(CHART, strict=True)
    problems = [m for m in lint["messages"] if m["severity"] > 1] + lint.get("errors", [])
    if problems:
        sys.exit(f"helm lint --strict: {problems}")
    print("helm lint --strict: no problem")

    fresh = HEADER + render()
    if not RENDERED.exists() or RENDERED.read_text() != fresh:
        sys.exit(f"{RENDERED.relative_to(ROOT)} differs from the chart's rendering: run `python3 scripts/k8s-manifests.py render`")
    print(f"{RENDERED.relative_to(ROOT)} matches the chart")

    validate(fresh, "defaults")
    docs = validate(render(EVERY_OPTION), "every option")
    # The options reach the pod: tensor parallelism sets the flag and the GPU count,
    # and the API key comes from the Secret.
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "2", args
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2, c["resources"]
    assert args[args.index("--api-key") + 1] == "$(CROSSKV_API_KEY)", args
    env = {e["name"]: e for e in c["env"]}
    assert env["CROSSKV_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "crosskv-api-key", env
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert "replicas" not in next(d for d in docs if d["kind"] == "Deployment")["spec"]
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [
        "crosskv_num_requests_waiting",
        "crosskv_kv_cache_usage_perc",
    ]
    # The router discovers exactly the replicas' pods, and the replicas' Service does
    # not select the router's.
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    replica_labels = deployments["crosskv"]["spec"]["template"]["metadata"]["labels"]
    router_pod = deployments["crosskv-router"]["spec"]["template"]
    rargs = router_pod["spec"]["containers"][0]["args"]
    selector = dict(a.split("=", 1) for a in rargs[rargs.index("--selector") + 1 :] if "=" in a)
    assert selector and selector.items() <= replica_labels.items(), (selector, replica_labels)
    assert rargs[rargs.index("--service-discovery-port") + 1] == "8000", rargs
    assert rargs[rargs.index("--api-key") + 1] == "$(CROSSKV_API_KEY)", rargs
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    replica_selector = services["crosskv"]["spec"]["selector"]
    assert not replica_selector.items() <= router_pod["metadata"]["labels"].items(), replica_selector
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}], role
    print("every option: flags, GPU count, API key Secret, autoscaling metrics and router discovery as set")


def main():
    if sys.argv[1:] == ["render"]:
        RENDERED.parent.mkdir(parents=True, exist_ok=True)
        RENDERED.write_text(HEADER + render())
        print(f"wrote {RENDERED.relative_to(ROOT)}")
    elif sys.argv[1:] == ["check"]:
        check()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
