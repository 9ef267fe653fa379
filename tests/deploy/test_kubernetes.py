"""deploy/kubernetes: every manifest parses, its core kinds load into the kubernetes client's typed models with no
field left over, and what it says about the server (flags, ports, probes, grace period, metric names) agrees
with the server itself."""
from pathlib import Path
from unittest import mock

import pytest
import yaml
from kubernetes.client import ApiClient

from server.__main__ import parse_args, server_config
from server.http.app import build_app

KUBE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
TYPED = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
         ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim", ("v1", "Pod"): "V1Pod", ("v1", "ServiceAccount"): "V1ServiceAccount",
         ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
         ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
         ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler"}
CUSTOM = {("monitoring.coreos.com/v1", "PodMonitor"), ("inference.networking.k8s.io/v1", "InferencePool")}


ONE_OFF = ["model-loader.yaml"]   # applied by hand (README), not by the kustomization


def manifests() -> list[dict]:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    files = kustomization["resources"] + ONE_OFF
    assert {p.name for p in KUBE.glob("*.yaml")} == set(files) | {"kustomization.yaml"}
    return [d for f in files for d in yaml.safe_load_all((KUBE / f).read_text()) if d]


def by_kind(kind: str, name: str) -> dict:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_loads_into_its_typed_model_with_nothing_left_over(doc):
    key = (doc["apiVersion"], doc["kind"])
    assert key in TYPED or key in CUSTOM, f"no check for {key}"
    if key in CUSTOM:
        assert doc["spec"], doc
        return
    client = ApiClient()
    typed = client._ApiClient__deserialize(doc, TYPED[key])
    # a misspelt or misplaced field is dropped by the typed model: the round trip would lose it
    assert client.sanitize_for_serialization(typed) == doc


def container() -> dict:
    return by_kind("Deployment", "lmserve")["spec"]["template"]["spec"]["containers"][0]


def server_args() -> list[str]:
    # the image's entrypoint, then the container's args
    return ["--host", "0.0.0.0", *container()["args"]]


def test_args_are_the_servers_own_flags():
    args = parse_args(server_args())   # an unknown flag or a bad value exits here
    assert args.model == "/models/model" and args.served_model_name == "lmserve"
    config = server_config(args)
    assert config.host == "0.0.0.0"
    # with API keys required, the scrapers (PodMonitor, endpoint picker) send none: /metrics must be open
    assert config.api_keys_file is None or config.open_metrics
    assert "authorization" not in by_kind("PodMonitor", "lmserve")["spec"]["podMetricsEndpoints"][0]


def test_the_hpa_owns_the_replica_count():
    assert "replicas" not in by_kind("Deployment", "lmserve")["spec"]


def test_ports_probes_and_grace_period_agree_with_the_server():
    args = server_config(parse_args(server_args()))
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port}
    app_routes = {r.path for r in _app().routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container()[probe]["httpGet"]
        assert get["path"] == "/health" and get["path"] in app_routes and ports[get["port"]] == args.port
    pod = by_kind("Deployment", "lmserve")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_timeout + 5
    service_ports = {p["name"]: p["targetPort"] for p in by_kind("Service", "lmserve")["spec"]["ports"]}
    assert set(service_ports.values()) <= set(ports)
    endpoint = by_kind("PodMonitor", "lmserve")["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics" and "/metrics" in app_routes
    assert by_kind("InferencePool", "lmserve")["spec"]["targetPorts"] == [{"number": args.port}]


def test_volumes_the_container_mounts_exist_and_the_model_is_read_only():
    pod = by_kind("Deployment", "lmserve")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    assert mounts["models"]["readOnly"] and container()["args"][0].startswith(f"--model={mounts['models']['mountPath']}")
    claim = by_kind("PersistentVolumeClaim", "lmserve-models")["metadata"]["name"]
    loader = by_kind("Pod", "lmserve-model-loader")["spec"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim
    assert loader["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert loader["containers"][0]["volumeMounts"][0]["mountPath"] == mounts["models"]["mountPath"]
    keys_file = next(a.split("=", 1)[1] for a in container()["args"] if a.startswith("--api-keys-file="))
    assert keys_file.startswith(mounts["api-keys"]["mountPath"] + "/") and volumes["api-keys"]["secret"]["secretName"]


def test_selectors_match_the_pods():
    labels = by_kind("Deployment", "lmserve")["spec"]["template"]["metadata"]["labels"]
    for selector in (by_kind("Service", "lmserve")["spec"]["selector"],
                     by_kind("PodMonitor", "lmserve")["spec"]["selector"]["matchLabels"],
                     by_kind("InferencePool", "lmserve")["spec"]["selector"]["matchLabels"],
                     by_kind("Deployment", "lmserve")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    monitor = by_kind("PodMonitor", "lmserve")["spec"]
    assert labels[monitor["jobLabel"]] == "lmserve"   # the job the alert rules and the dashboard select
    hpa = by_kind("HorizontalPodAutoscaler", "lmserve")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "lmserve"


def test_the_endpoint_picker_reads_metrics_the_server_serves(served_metrics):
    args = by_kind("Deployment", "lmserve-epp")["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args)
    named = {flags[f] for f in ("total-queued-requests-metric", "total-running-requests-metric",
                                "kv-cache-usage-percentage-metric", "lora-info-metric")}
    assert named <= served_metrics
    assert flags["pool-name"] == by_kind("InferencePool", "lmserve")["metadata"]["name"]
    assert int(flags["grpc-port"]) == by_kind("InferencePool", "lmserve")["spec"]["endpointPickerRef"]["port"]["number"]


def test_the_hpa_scales_on_a_metric_the_server_serves(served_metrics):
    metric = by_kind("HorizontalPodAutoscaler", "lmserve")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in served_metrics


def _app():
    return build_app(mock.MagicMock())   # the routes only: no engine is called
