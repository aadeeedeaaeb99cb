"""deploy/k8s rendered as a cluster would receive it (`kubectl kustomize`), and the parts of it the tests read."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
NAMESPACE = "meshserve"
NODE = "node"  # the meshserve container's name in the Deployment

Obj = dict[str, Any]


def render(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH (it renders Kustomize offline); install kubectl to check deploy/k8s")
    done = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return done.stdout


def objects(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, its pod spec) for every object that runs pods."""
    for obj in objs:
        template = obj.get("spec", {}).get("template", {})
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job") and "spec" in template:
            yield obj, template["spec"]


def containers(spec: Obj) -> list[Obj]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def node_container(objs: list[Obj]) -> Obj:
    spec = one(objs, "Deployment", "meshserve")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == NODE)


def env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(text: str | int) -> int:
    """A Kubernetes memory or storage quantity ("2Gi", "512Mi", "1G", "1048576") in bytes."""
    text = str(text)
    for suffix, factor in sorted(_QUANTITY.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)
