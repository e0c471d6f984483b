"""docker/k8s/: the manifests parse and agree with the code and with each other — env names are settings,
probes hit routes the app has on the port it listens on, the drain fits the grace period, selectors select,
the HPA and Ingress point at objects that exist, the GPU variant asks for a GPU."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from ptserve.server.api.app import create_app
from ptserve.server.serving import AFTER_DRAIN_S
from ptserve.server.settings import Settings
from tests.deploy.test_nginx_proxy import INFERENCE_PATHS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
DOCKERFILE_UID = 10001
SETTINGS_ENV = {f"PTSERVE_{name.upper()}" for name in Settings.model_fields}


def docs() -> list[dict]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def of_kind(kind: str) -> list[dict]:
    return [d for d in docs() if d["kind"] == kind]


def one(kind: str) -> dict:
    found = of_kind(kind)
    assert len(found) == 1, kind
    return found[0]


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in of_kind("Deployment")}


@pytest.fixture(scope="module")
def config() -> dict[str, str]:
    return one("ConfigMap")["data"]


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory) -> set[str]:
    return set(create_app(Settings(store=f"file://{tmp_path_factory.mktemp('store')}")).openapi()["paths"])


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, q
    return int(m.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]


def test_every_manifest_parses_and_kustomization_lists_real_files():
    for d in docs():
        assert {"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"]["name"], d
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "deployment.yaml" in kustomization["resources"]
    assert "deployment-gpu.yaml" not in kustomization["resources"], "apply one variant, not both"
    assert not any("secret" in r for r in kustomization["resources"]), "the Secret is created out of band"


def test_every_ptserve_env_name_is_a_setting():
    names = set()
    for path in K8S.glob("*.yaml"):
        names |= set(re.findall(r"PTSERVE_[A-Z0-9_]+", path.read_text()))
    assert names and names <= SETTINGS_ENV, sorted(names - SETTINGS_ENV)


def test_configmap_is_valid_settings(config, monkeypatch):
    for key in [k for k in os.environ if k.startswith("PTSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.store.startswith("redis://")
    assert "PTSERVE_ADMIN_KEY" not in config, "the admin key belongs in the Secret"


def test_probes_hit_real_routes_on_the_serving_port(deployments, config, app_paths):
    port = int(config["PTSERVE_PORT"])
    for name, d in deployments.items():
        c = container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": port}, name
        ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
        assert (ready["path"], live["path"]) == ("/readyz", "/healthz"), name
        assert {ready["path"], live["path"]} <= app_paths
        assert ready["port"] == live["port"] == "http"
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] in app_paths


def test_drain_fits_the_grace_period(deployments, config):
    drain = float(config["PTSERVE_DRAIN_TIMEOUT_S"])
    for name, d in deployments.items():
        pre_stop = container(d)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", name
        grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > float(pre_stop[1]) + drain + AFTER_DRAIN_S, name


def test_settings_and_secret_wiring(deployments):
    secret = one("Secret")
    configmap = one("ConfigMap")["metadata"]["name"]
    for name, d in deployments.items():
        c = container(d)
        assert c["envFrom"] == [{"configMapRef": {"name": configmap}}]
        env = env_of(c)
        ref = env["PTSERVE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], name
        assert env["PTSERVE_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        pod = d["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] and pod["runAsUser"] == DOCKERFILE_UID
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        writable = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/app/.cache", "/data"} <= writable, "a read-only root needs these writable"


def test_resources_fit_the_settings(deployments, config):
    cpu = container(deployments["ptserve"])
    requests, limits = cpu["resources"]["requests"], cpu["resources"]["limits"]
    assert int(config["PTSERVE_THREADS"]) == int(requests["cpu"]), "torch threads = the CPU request"
    assert int(config["PTSERVE_CACHE_BYTES"]) < quantity_bytes(limits["memory"]) // 2
    assert quantity_bytes(requests["memory"]) <= quantity_bytes(limits["memory"])


def test_gpu_variant_asks_for_a_gpu_and_uses_it(deployments):
    gpu = deployments["ptserve-gpu"]
    c = container(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = env_of(c)
    assert env["PTSERVE_DEVICE"]["value"] == "cuda"
    assert c["image"].endswith(":cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["spec"]["template"]["spec"]["tolerations"])
    cpu_c = container(deployments["ptserve"])
    assert c["readinessProbe"] == cpu_c["readinessProbe"] and c["livenessProbe"] == cpu_c["livenessProbe"]
    assert c["lifecycle"] == cpu_c["lifecycle"]


def test_selectors_select(deployments):
    service, pdb = one("Service"), one("PodDisruptionBudget")
    for name, d in deployments.items():
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
        assert service["spec"]["selector"].items() <= pod_labels.items(), name
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), name
    cpu, gpu = (deployments[n]["spec"]["selector"]["matchLabels"] for n in ("ptserve", "ptserve-gpu"))
    assert cpu != gpu, "the two Deployments must not own each other's pods"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_hpa_scales_a_deployment_that_exists(deployments):
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] in deployments
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    scale_down = hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    assert scale_down >= 300, "scale down slowly: each change moves adapters to cold caches"


def test_ingress_routes_like_the_nginx_template():
    service = one("Service")
    template = (ROOT / "docker" / "nginx" / "ptserve.conf.template").read_text()
    hash_key = re.search(r"^\s*hash (\S+) consistent;", template, re.M).group(1)
    ingresses = {i["metadata"]["name"]: i for i in of_kind("Ingress")}
    retried_after_send = set()
    for name, ingress in ingresses.items():
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == hash_key
        next_upstream = annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"].split()
        assert not any(a.startswith("http_") for a in next_upstream)
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
                if "non_idempotent" in next_upstream:
                    assert path["pathType"] == "Exact"
                    retried_after_send.add(path["path"])
    assert retried_after_send == INFERENCE_PATHS
