"""version_policy as Triton applies it: latest N (default 1), all, specific; a request without a version gets
the newest served one and a version the policy does not serve is NOT_FOUND naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnode.errors import LoadFailed, ModelNotFound
from meshnode.storage.repository import available_versions, model_source
from meshnode.storage.versions import only, read_config


def _model(tmp_path: Path, versions: tuple[int, ...], policy: str | None) -> Path:
    model_dir = tmp_path / "m"
    for version in versions:
        (model_dir / str(version)).mkdir(parents=True)
        (model_dir / str(version) / "model.onnx").write_bytes(b"x")
    if policy is not None:
        (model_dir / "config.pbtxt").write_text(f'name: "m"\nversion_policy: {policy}\n')
    return model_dir


@pytest.mark.parametrize(("policy", "served"), [
    (None, ["10"]),  # Triton's default: the latest one, by number, not by name ("10" > "9")
    ("{ latest { num_versions: 2 } }", ["9", "10"]),
    ("{ latest { num_versions: 9 } }", ["1", "2", "9", "10"]),
    ("{ all { } }", ["1", "2", "9", "10"]),
    ("{ specific { versions: [2, 9, 7] } }", ["2", "9"]),  # 7 is not on disk: not served
])
def test_the_policy_decides_which_versions_are_served(tmp_path: Path, policy: str | None, served: list[str]) -> None:
    assert available_versions(_model(tmp_path, (1, 2, 9, 10), policy)) == served


def test_a_request_without_a_version_gets_the_newest_served_and_others_are_not_found(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, (1, 2, 3), "{ specific { versions: [1, 2] } }")
    assert model_source("m", model_dir, "").version == "2"
    assert model_source("m", model_dir, "1").version == "1"
    with pytest.raises(ModelNotFound, match=r"^Request for unknown model: 'm' version 3 is not found$"):
        model_source("m", model_dir, "3")


def test_a_broken_config_fails_the_load_naming_the_file(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, (1,), "{ sometimes { } }")
    with pytest.raises(LoadFailed, match=r"config\.pbtxt is not a valid model config"):
        available_versions(model_dir)


def test_only_narrows_a_config_to_the_versions_held_and_keeps_the_rest(tmp_path: Path) -> None:
    config = read_config(_model(tmp_path, (1, 2), "{ all { } }"))
    narrowed = only(config, ["2", "1"])
    assert list(narrowed.version_policy.specific.versions) == [1, 2]
    assert narrowed.name == "m" and config.version_policy.WhichOneof("policy_choice") == "all"


OVERRIDE = '{"max_batch_size": "16", "version_policy": {"all": {}}}'


def test_a_config_override_replaces_the_config_pbtxt_whole(tmp_path: Path) -> None:
    model_dir = _model(tmp_path, (1, 2, 3), "{ latest { num_versions: 1 } }")
    config = read_config(model_dir, OVERRIDE)
    assert config.max_batch_size == 16 and config.name == ""  # nothing of the file's is left
    assert available_versions(model_dir, OVERRIDE) == ["1", "2", "3"]
    source = model_source("m", model_dir, "1", OVERRIDE)
    assert (source.version, source.config_override) == ("1", OVERRIDE)
    assert model_source("m", model_dir, "").version == "3"  # without it, the file's policy


def test_an_override_that_is_no_model_config_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(LoadFailed, match="^the model's config override is not a valid model config"):
        read_config(_model(tmp_path, (1,), None), '{"max_batch_size": "many"}')
