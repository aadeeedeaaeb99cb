"""The manifests and the image name only settings the node has: every MESHSERVE_* variable is a NodeSettings
field (MESHSERVE_ + the field's name in capitals) and every --flag given to the node is one of `meshserve node`'s."""

from __future__ import annotations

import argparse
import re
import tomllib

from meshnode.cli.main import build_parser
from meshnode.settings import NodeSettings
from tests.deploy.manifests import DOCKERFILE, NODE, ROOT, Obj, one

_VARIABLE = re.compile(r"\bMESHSERVE_[A-Z0-9_]+\b")


def settings_variables() -> set[str]:
    return {f"MESHSERVE_{name.upper()}" for name in NodeSettings.model_fields}


def node_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in sub.choices["node"]._actions for flag in action.option_strings}


def unknown_variables(text: str) -> set[str]:
    return set(_VARIABLE.findall(text)) - settings_variables()


def unknown_flags(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0] for w in words if w.startswith("--")} - node_flags()


def test_the_checks_see_drift() -> None:
    assert unknown_variables("env:\n- name: MESHSERVE_CAPACITY\n- name: MESHSERVE_NO_SUCH_SETTING\n") == {
        "MESHSERVE_NO_SUCH_SETTING"}
    assert unknown_flags(["--capacity=1GiB", "--etcd", "x", "--no-such-flag=1"]) == {"--no-such-flag"}


def test_manifests_name_only_node_settings(rendered: dict[str, str]) -> None:
    unknown: dict[str, list[str]] = {}
    for overlay, text in rendered.items():
        for name in sorted(unknown_variables(text)):
            unknown.setdefault(name, []).append(overlay)
    assert not unknown, f"variables that are no NodeSettings field (name: overlays): {unknown}"


def test_manifests_give_the_node_only_its_flags(manifests: dict[str, list[Obj]]) -> None:
    for overlay, objs in manifests.items():
        spec = one(objs, "Deployment", "meshserve")["spec"]["template"]["spec"]
        node = next(c for c in spec["containers"] if c["name"] == NODE)
        assert not unknown_flags(node.get("command", []) + node.get("args", [])), overlay


def test_the_image_runs_the_node_with_its_settings() -> None:
    text = DOCKERFILE.read_text()
    assert not unknown_variables(text)
    assert 'ENTRYPOINT ["meshserve", "node"]' in text


def test_the_image_builds_from_every_package_the_wheel_holds() -> None:
    """A package added to the wheel must reach the builder: copied by the Dockerfile, let through the ignore file."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = DOCKERFILE.read_text()
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().split()
    for package in packages:
        assert f"COPY {package}/ {package}/" in dockerfile and f"!{package}/" in ignore, package
