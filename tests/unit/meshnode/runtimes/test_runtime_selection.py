"""Choosing the runtime by name, its settings and flags, and what an upload to Triton carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.local.triton_models import write_python_add_sub
from meshnode.cli.main import build_parser
from meshnode.local.triton import TritonInstall, TritonProcessError
from meshnode.runtimes import RUNTIMES, create_runtime
from meshnode.runtimes.onnx import OnnxRuntime
from meshnode.runtimes.triton import TritonRuntime
from meshnode.settings import NodeSettings
from meshnode.storage.repository import model_source


def settings(tmp_path: Path, **extra: object) -> NodeSettings:
    return NodeSettings(etcd="127.0.0.1:2379", model_repository=tmp_path, capacity="1GiB", **extra)


async def test_the_runtime_is_built_from_its_name(tmp_path: Path) -> None:
    onnx = create_runtime(settings(tmp_path))
    triton = create_runtime(settings(tmp_path, runtime="triton", triton_url="127.0.0.1:8001"))
    try:
        assert isinstance(onnx, OnnxRuntime) and isinstance(triton, TritonRuntime)
        assert {onnx.name, triton.name} == set(RUNTIMES)
        assert triton.url == "127.0.0.1:8001"
    finally:
        await onnx.close()
        await triton.close()


def test_runtime_triton_without_a_url_is_refused_with_the_flag_to_use(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--triton-url HOST:PORT"):
        settings(tmp_path, runtime="triton")


def test_an_unknown_runtime_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unknown runtime 'tensorrt': choose one of onnxruntime, triton"):
        settings(tmp_path, runtime="tensorrt")


def test_node_flags_select_triton() -> None:
    args = build_parser().parse_args(["node", "--runtime", "triton", "--triton-url", "127.0.0.1:8001",
                                      "--triton-model-repository", "/srv/models"])
    assert (args.runtime, args.triton_url, args.triton_model_repository) == ("triton", "127.0.0.1:8001", "/srv/models")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["node", "--runtime", "tensorrt"])


def test_an_upload_carries_the_version_files_and_the_config_as_json_under_the_models_name(tmp_path: Path) -> None:
    storage = write_python_add_sub(tmp_path, "stored-as", version=3, width=8)
    (storage / "labels.txt").write_text("a\nb\n")
    (storage / "3" / "__pycache__").mkdir()
    (storage / "3" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"compiled by Triton")
    upload = TritonRuntime("127.0.0.1:1")._load_request(model_source("served-as", storage, ""), ["3"])
    assert sorted(upload.files) == ["file:3/model.py", "file:labels.txt"]
    assert upload.files["file:3/model.py"] == (storage / "3" / "model.py").read_bytes()
    config = json.loads(upload.config)
    assert config["name"] == "served-as" and config["backend"] == "python"
    assert [(i["name"], i["dims"]) for i in config["input"]] == [("INPUT0", ["-1", "8"]), ("INPUT1", ["-1", "8"])]
    assert config["versionPolicy"] == {"specific": {"versions": ["3"]}}


def test_versions_held_side_by_side_are_loaded_as_one_set_and_the_rest_of_the_model_dir_is_not(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        storage = write_python_add_sub(tmp_path, "multi", version=version, width=4)
    upload = TritonRuntime("127.0.0.1:1")._load_request(model_source("multi", storage, "3"), ["1", "3"])
    assert sorted(upload.files) == ["file:1/model.py", "file:3/model.py"]
    assert json.loads(upload.config)["versionPolicy"] == {"specific": {"versions": ["1", "3"]}}


def test_a_model_in_tritons_own_repository_sends_its_config_but_no_files(tmp_path: Path) -> None:
    storage = write_python_add_sub(tmp_path, "own", version=2, width=4)
    upload = TritonRuntime("127.0.0.1:1", tmp_path)._load_request(model_source("own", storage, ""), ["2"])
    assert upload.files == {}
    assert json.loads(upload.config)["versionPolicy"] == {"specific": {"versions": ["2"]}}



def test_a_config_override_is_sent_to_triton_in_place_of_the_config_pbtxt(tmp_path: Path) -> None:
    storage = write_python_add_sub(tmp_path, "over", version=1, width=4)
    override = '{"backend": "python", "max_batch_size": "16"}'
    upload = TritonRuntime("127.0.0.1:1")._load_request(model_source("over", storage, "", override), ["1"])
    config = json.loads(upload.config)
    assert (config["name"], config["backend"], config["maxBatchSize"]) == ("over", "python", 16)
    assert "input" not in config  # the file's tensors are not merged in: Triton auto-completes them
    assert config["versionPolicy"] == {"specific": {"versions": ["1"]}}

def test_a_missing_triton_install_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(TritonProcessError, match="make triton"):
        TritonInstall.find(tmp_path / "nowhere")
