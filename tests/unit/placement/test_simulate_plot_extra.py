"""`simulate --plot` without the optional matplotlib extra names the extra, before any simulation runs."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

import pytest

from placement import simulate_cli


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    ran: list[object] = []
    monkeypatch.setattr(simulate_cli, "compare", lambda *args: ran.append(args))
    out, err = io.StringIO(), io.StringIO()

    code = simulate_cli.main(["--nodes", "2", "--capacity", "5%", "--workload", "zipf:models=50,requests=100",
                              "--plot", str(tmp_path)], stdout=out, stderr=err)

    assert code == 2
    assert err.getvalue() == "meshserve simulate: --plot needs matplotlib: pip install 'meshserve[plot]'\n"
    assert ran == [] and out.getvalue() == "" and list(tmp_path.iterdir()) == []
