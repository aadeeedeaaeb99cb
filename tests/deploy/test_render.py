"""Every overlay renders, and what issue 18 asks of the pods holds in each: drain, probes, spread, budget,
restricted security, memory headroom over --capacity, the advertised address peers can verify."""

from __future__ import annotations

import inspect
import json
import re

import pytest

from meshnode.mesh.drain import HANDOFF_BUDGET_S
from meshnode.node import Node
from meshnode.settings import parse_size
from tests.deploy.manifests import (
    NAMESPACE,
    OVERLAYS,
    ROOT,
    Obj,
    containers,
    env,
    node_container,
    one,
    pod_specs,
    quantity_bytes,
)

CLUSTER_SCOPED = {"Namespace"}
NODE_LABELS = {"app.kubernetes.io/name": "meshserve", "app.kubernetes.io/component": "node"}
SERVER_GRACE_S = inspect.signature(Node.stop).parameters["grace_s"].default  # calls in flight may finish


def _tls(objs: list[Obj]) -> bool:
    return "MESHSERVE_PEER_CERT" in env(node_container(objs))


def test_the_overlays_are_the_documented_ones() -> None:
    assert OVERLAYS == ["cert-manager", "external-etcd", "onnx", "triton"]


def test_every_namespaced_object_lands_in_the_meshserve_namespace(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        misplaced = [f"{o['kind']}/{o['metadata']['name']}" for o in objs
                     if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != NAMESPACE]
        assert not misplaced, f"{overlay}: outside namespace {NAMESPACE}: {misplaced}"


def test_pods_run_restricted(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        for workload, spec in pod_specs(objs):
            where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault", where
            assert spec["automountServiceAccountToken"] is False, where
            # Service links would set MESHSERVE_PORT=tcp://... in every pod of the namespace.
            assert spec["enableServiceLinks"] is False, where
            for c in containers(spec):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, f"{where} {c['name']}"
                assert sc["readOnlyRootFilesystem"] is True, f"{where} {c['name']}"
                assert sc["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
                assert not sc["capabilities"].get("add"), f"{where} {c['name']}"
                assert {"cpu", "memory"} <= set(c["resources"]["limits"]), f"{where} {c['name']}"


def test_nodes_drain_before_they_are_killed(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        deployment = one(objs, "Deployment", "meshserve")
        spec = deployment["spec"]["template"]["spec"]
        pre_stop = node_container(objs)["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", overlay
        assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + HANDOFF_BUDGET_S + SERVER_GRACE_S, overlay
        # A rolling restart adds a node before it drains one.
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, overlay


def test_probes_ask_the_grpc_health_service(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        node = node_container(objs)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if _tls(objs):  # the kubelet's gRPC probe cannot speak TLS: the same check, run in the pod
                command = node[probe]["exec"]["command"]
                assert "grpc_health.v1" in command[-1] and "127.0.0.1:8033" in command[-1], (overlay, probe)
                assert "grpc" not in node[probe], (overlay, probe)
            else:
                assert node[probe]["grpc"]["port"] == 8033, (overlay, probe)


def test_budget_spread_and_service_select_the_nodes(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        template = one(objs, "Deployment", "meshserve")["spec"]["template"]
        assert NODE_LABELS.items() <= template["metadata"]["labels"].items(), overlay
        pdb = one(objs, "PodDisruptionBudget", "meshserve")
        assert pdb["spec"]["selector"]["matchLabels"] == NODE_LABELS and pdb["spec"]["maxUnavailable"] == 1, overlay
        keys = {c["topologyKey"] for c in template["spec"]["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, overlay
        service = one(objs, "Service", "meshserve")
        assert service["spec"]["selector"] == NODE_LABELS, overlay
        ports = {p["name"]: p["containerPort"] for p in node_container(objs)["ports"]}
        assert ports[service["spec"]["ports"][0]["targetPort"]] == 8033, overlay


def test_peers_reach_each_node_at_an_address_they_can_verify(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        advertised = env(node_container(objs))["MESHSERVE_ADVERTISE_HOST"]
        if not _tls(objs):
            assert advertised["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", overlay
            continue
        # Under TLS, peers dial a name the one peer certificate covers: POD.meshserve-nodes.NAMESPACE.svc...
        assert advertised["value"].startswith("$(MESHSERVE_INSTANCE_ID).meshserve-nodes."), overlay
        domain = advertised["value"].split(".", 1)[1]
        assert domain.startswith(f"meshserve-nodes.{NAMESPACE}.svc"), overlay
        assert one(objs, "Deployment", "meshserve")["spec"]["template"]["spec"]["subdomain"] == "meshserve-nodes"
        for certificate in (o for o in objs if o["kind"] == "Certificate"):
            if certificate["spec"]["secretName"] == "meshserve-peer-tls":
                assert f"*.{domain}" in certificate["spec"]["dnsNames"], overlay


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def test_variable_references_name_variables_defined_before(manifests: dict[str, list[Obj]]) -> None:
    """The kubelet expands $(VAR) only from variables listed earlier; an unknown one stays as typed."""
    for overlay, objs in manifests.items():
        for _, spec in pod_specs(objs):
            for c in containers(spec):
                seen: list[str] = []
                for entry in c.get("env", []):
                    for name in _REFERENCE.findall(entry.get("value", "")):
                        assert name in seen, f"{overlay} {c['name']}: {entry['name']} uses $({name}) before it"
                    seen.append(entry["name"])
                for word in c.get("command", []) + c.get("args", []):
                    for name in _REFERENCE.findall(word):
                        assert name in seen, f"{overlay} {c['name']}: {word} names an undefined $({name})"


def test_memory_limit_leaves_headroom_over_capacity(manifests: dict[str, list[Obj]]) -> None:
    """The container holding the models (the node, or Triton beside it) has capacity x 1.2 + 512MiB at least."""
    for overlay, objs in manifests.items():
        node = node_container(objs)
        settings = env(node)
        capacity = parse_size(settings["MESHSERVE_CAPACITY"]["value"])
        holder = node
        if settings.get("MESHSERVE_RUNTIME", {}).get("value") == "triton":
            spec = one(objs, "Deployment", "meshserve")["spec"]["template"]["spec"]
            holder = next(c for c in containers(spec) if c["name"] == "triton")
        limits, requests = holder["resources"]["limits"], holder["resources"]["requests"]
        assert quantity_bytes(limits["memory"]) >= capacity * 1.2 + 512 * 2**20, overlay
        # Requests equal to limits: the scheduler reserves what the node will use, and nothing is overcommitted.
        assert quantity_bytes(requests["memory"]) == quantity_bytes(limits["memory"]), overlay


def test_disk_cache_fits_its_volume(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        node = node_container(objs)
        settings = env(node)
        path = settings["MESHSERVE_DISK_CACHE"]["value"]
        mount = next(m for m in node["volumeMounts"] if m["mountPath"] == path)
        spec = one(objs, "Deployment", "meshserve")["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        size = parse_size(settings["MESHSERVE_DISK_CACHE_SIZE"]["value"])
        assert size < quantity_bytes(volume["emptyDir"]["sizeLimit"]), overlay


def test_files_named_in_settings_are_mounted(manifests: dict[str, list[Obj]]) -> None:
    """Certificates, keys, secrets: each path a setting names lies in a volume mounted into the container."""
    for overlay, objs in manifests.items():
        node = node_container(objs)
        mounts = [m["mountPath"] for m in node["volumeMounts"]]
        for name, entry in env(node).items():
            value = entry.get("value", "")
            if value.startswith("/"):
                assert any(value == m or value.startswith(m + "/") for m in mounts), f"{overlay}: {name}={value}"


@pytest.mark.parametrize("overlay", ["onnx", "triton", "cert-manager"])
def test_only_mesh_pods_reach_etcd(manifests: dict[str, list[Obj]], overlay: str) -> None:
    policy = one(manifests[overlay], "NetworkPolicy", "meshserve-etcd")
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports & {2379, 2380}:
            selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
            assert all(s.get("app.kubernetes.io/name") == "meshserve" for s in selectors), rule


@pytest.mark.parametrize("overlay", ["external-etcd", "cert-manager"])
def test_only_mesh_pods_reach_the_peer_port(manifests: dict[str, list[Obj]], overlay: str) -> None:
    objs = manifests[overlay]
    peer_port = int(env(node_container(objs))["MESHSERVE_PEER_PORT"]["value"])
    rules = one(objs, "NetworkPolicy", "meshserve-node")["spec"]["ingress"]
    opening = [r for r in rules if peer_port in {p["port"] for p in r["ports"]}]
    assert opening and all(r["from"] == [{"podSelector": {"matchLabels": NODE_LABELS}}] for r in opening)


def test_grafana_gets_the_dashboard(manifests: dict[str, list[Obj]]) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "meshserve.json").read_text())
    for overlay, objs in manifests.items():
        config_map = one(objs, "ConfigMap", "meshserve-grafana-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1", overlay
        assert json.loads(config_map["data"]["meshserve.json"]) == dashboard, overlay
