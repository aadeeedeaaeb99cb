"""Each overlay of deploy/k8s rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, Obj, objects, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def manifests(rendered: dict[str, str]) -> dict[str, list[Obj]]:
    return {overlay: objects(text) for overlay, text in rendered.items()}
