"""Every rendered object against the schemas of a current Kubernetes release (kubernetes-validate's bundled
schemas, offline, strict: an unknown field fails). Custom resources have no bundled schema: their
references are checked instead."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.deploy.manifests import Obj, one

KUBERNETES = "1.37.0"
CUSTOM = {("cert-manager.io/v1", "Certificate"), ("cert-manager.io/v1", "Issuer"),
          ("monitoring.coreos.com/v1", "ServiceMonitor")}


def test_objects_match_the_release_schemas(manifests: dict[str, list[Obj]]) -> None:
    checked = 0
    for overlay, objs in manifests.items():
        for obj in objs:
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, KUBERNETES, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert (obj["apiVersion"], obj["kind"]) in CUSTOM, f"{where}: no schema, and not a known resource"
                continue
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {'.'.join(str(p) for p in error.path)}: {error.message}")
            checked += 1
    assert checked >= 40


def test_the_validator_refuses_a_misspelt_field(manifests: dict[str, list[Obj]]) -> None:
    deployment = copy.deepcopy(one(manifests["onnx"], "Deployment", "meshserve"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessprobe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_certificates_name_issuers_and_secrets_the_pods_mount(manifests: dict[str, list[Obj]]) -> None:
    objs = manifests["cert-manager"]
    issuers = {o["metadata"]["name"] for o in objs if o["kind"] == "Issuer"}
    issued = {}
    for certificate in (o for o in objs if o["kind"] == "Certificate"):
        spec = certificate["spec"]
        assert spec["issuerRef"]["kind"] == "Issuer" and spec["issuerRef"]["name"] in issuers
        issued[spec["secretName"]] = spec
    for issuer in (o for o in objs if o["kind"] == "Issuer" and "ca" in o["spec"]):
        assert issued[issuer["spec"]["ca"]["secretName"]]["isCA"] is True
    mounted = {v["secret"]["secretName"] for o in objs if o["kind"] in ("Deployment", "StatefulSet")
               for v in o["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    tls_secrets = {"meshserve-tls", "meshserve-peer-tls", "meshserve-etcd-tls"}
    assert tls_secrets <= mounted and tls_secrets <= set(issued)


def test_service_monitor_scrapes_a_port_of_a_service_it_selects(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        monitor = one(objs, "ServiceMonitor", "meshserve")
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        selected = [o for o in objs if o["kind"] == "Service" and wanted <= o["metadata"]["labels"].items()]
        assert selected, overlay
        for endpoint in monitor["spec"]["endpoints"]:
            assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected), overlay
