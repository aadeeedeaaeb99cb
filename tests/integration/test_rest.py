"""KServe v2 REST (`--http-port`) through a two-node mesh: tritonclient.http against every endpoint, binary
tensors included, and plain HTTP for the JSON forms and bad input."""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from deploy.local.models import write_add_sub, write_identity
from meshnode.local.etcd import EtcdProcess
from meshnode.local.node import NodeProcess
from tests.integration.conftest import start_nodes

LIMIT = 1_000_000  # --http-max-request-size


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rest-repo")
    write_add_sub(root, "simple", width=4)
    write_add_sub(root, "simple", version=2, width=4)
    (root / "simple" / "config.pbtxt").write_text("version_policy: { all { } }\n")
    write_identity(root, "strings", "BYTES", shape=(-1, 3))
    write_add_sub(root, "spare", width=4)
    return root


@pytest.fixture(scope="module")
def nodes(etcd: EtcdProcess, repo: Path) -> Iterator[list[NodeProcess]]:
    started = start_nodes(etcd, repo, 2, extra_args=["--http-port", "0", "--http-max-request-size", str(LIMIT)])
    try:
        yield started
    finally:
        for node in started:
            node.stop()


def http_target(node: NodeProcess) -> str:
    match = re.search(r" http=(\S+:\d+)", node.log())
    assert match, node.log()
    return match.group(1)


@pytest.fixture(scope="module")
def targets(nodes: list[NodeProcess]) -> list[str]:
    return [http_target(node) for node in nodes]


def _pair(binary: bool) -> list[httpclient.InferInput]:
    inputs = [httpclient.InferInput(n, [2, 4], "FP32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4), binary_data=binary)
    inputs[1].set_data_from_numpy(np.ones((2, 4), np.float32), binary_data=binary)
    return inputs


@pytest.mark.parametrize("binary", [False, True])
def test_infer_through_every_node_in_json_and_binary(targets: list[str], binary: bool) -> None:
    expected = np.arange(8, dtype=np.float32).reshape(2, 4)
    for target in targets:
        with httpclient.InferenceServerClient(target) as client:
            outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
                       httpclient.InferRequestedOutput("OUTPUT1", binary_data=not binary)]
            result = client.infer("simple", _pair(binary), outputs=outputs, request_id="r1")
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected + 1)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected - 1)
            response = result.get_response()
            assert response["id"] == "r1" and response["model_name"] == "simple" and response["model_version"] == "2"
            older = client.infer("simple", _pair(binary), model_version="1")
            assert older.get_response()["model_version"] == "1"


def test_bytes_tensors_travel_in_json_and_binary(targets: list[str]) -> None:
    words = np.array([b"mesh", "s\u00e9rve".encode(), b""], dtype=np.object_).reshape(1, 3)
    with httpclient.InferenceServerClient(targets[1]) as client:
        for binary in (False, True):
            tensor = httpclient.InferInput("INPUT0", [1, 3], "BYTES")
            tensor.set_data_from_numpy(words, binary_data=binary)
            out = client.infer("strings", [tensor], outputs=[httpclient.InferRequestedOutput("OUTPUT0",
                                                                                             binary_data=binary)])
            assert [bytes(v) if not isinstance(v, str) else v.encode() for v in out.as_numpy("OUTPUT0").ravel()] == [
                b"mesh", "s\u00e9rve".encode(), b""]


def test_health_metadata_config_and_statistics(targets: list[str]) -> None:
    with httpclient.InferenceServerClient(targets[0]) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata()["name"] == "meshserve"
        assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
        assert not client.is_model_ready("nope")
        metadata = client.get_model_metadata("simple")
        assert metadata["versions"] == ["1", "2"] and metadata["inputs"][0]["shape"] == [-1, 4]
        config = client.get_model_config("simple")
        assert config["platform"] == "onnxruntime_onnx" and config["max_batch_size"] == 4
        assert config["input"][0]["dims"] == [4] and config["input"][0]["data_type"] == "TYPE_FP32"
        before = client.get_inference_statistics("spare")["model_stats"][0]["inference_stats"]["success"]["count"]
        for _ in range(3):
            client.infer("spare", _pair(False))
    with httpclient.InferenceServerClient(targets[1]) as client:
        stats = client.get_inference_statistics("spare")["model_stats"]
        assert [s["inference_stats"]["success"]["count"] for s in stats] == [before + 3]
        assert "spare" in {s["name"] for s in client.get_inference_statistics()["model_stats"]}
        mine = client.get_inference_statistics("spare", headers={"meshserve-scope": "node"})["model_stats"]
        assert sum(s["inference_stats"]["success"]["count"] for s in mine) <= before + 3


def test_repository_index_load_and_unload(targets: list[str]) -> None:
    with httpclient.InferenceServerClient(targets[1]) as client:
        assert {"simple", "strings", "spare"} <= {m["name"] for m in client.get_model_repository_index()}
        client.load_model("strings")
        assert client.is_model_ready("strings")
        client.unload_model("spare")
        assert not client.is_model_ready("spare")
        client.load_model("spare")
        assert client.is_model_ready("spare")
        with pytest.raises(InferenceServerException) as raised:
            client.load_model("nope")
        assert raised.value.status() == "404" or "nope" in raised.value.message()


def test_settings_and_shared_memory(targets: list[str]) -> None:
    with httpclient.InferenceServerClient(targets[0]) as client:
        assert client.get_log_settings()["log_info"] is True
        assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
        assert client.update_log_settings({"log_verbose_level": 0})["log_verbose_level"] == 0
        assert client.get_trace_settings()["trace_level"] == ["OFF"]
        assert client.get_system_shared_memory_status() == []
        assert client.get_cuda_shared_memory_status() == []
        client.unregister_system_shared_memory()
        with pytest.raises(InferenceServerException, match="send its tensors"):
            client.register_system_shared_memory("r", "/key", 64)


def _request(target: str, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    host, port = target.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def _error(status_body: tuple[int, bytes, dict[str, str]]) -> tuple[int, str]:
    status, body, _ = status_body
    return status, json.loads(body)["error"]


def test_the_json_form_by_plain_http(targets: list[str]) -> None:
    request = {"id": "7", "inputs": [
        {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [[1, 2, 3, 4]]},
        {"name": "INPUT1", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}],
        "outputs": [{"name": "OUTPUT0"}]}
    status, body, headers = _request(targets[0], "POST", "/v2/models/simple/versions/1/infer",
                                     json.dumps(request).encode())
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["id"] == "7" and answer["model_version"] == "1"
    assert answer["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 4], "data": [2, 3, 4, 5]}]
    status, body, _ = _request(targets[0], "GET", "/v2/models/simple")
    assert status == 200 and json.loads(body)["name"] == "simple"


def _binary_body(header: dict[str, object], data: bytes) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(header).encode()
    return encoded + data, {"Inference-Header-Content-Length": str(len(encoded))}


def test_bad_input_gets_a_client_error_naming_it(targets: list[str]) -> None:
    target = targets[1]
    assert _error(_request(target, "POST", "/v2/models/simple/infer", b"{not json"))[0] == 400
    assert "malformed JSON" in _error(_request(target, "POST", "/v2/models/simple/infer", b"{not json"))[1]
    assert _error(_request(target, "GET", "/v2/models/nope"))[0] == 404
    assert _error(_request(target, "GET", "/v2/nowhere"))[0] == 404
    status, message = _error(_request(target, "POST", "/v2/models/simple/infer", b"[1, 2]"))
    assert status == 400 and "JSON object" in message
    wrong_count = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}
    status, message = _error(_request(target, "POST", "/v2/models/simple/infer", json.dumps(wrong_count).encode()))
    assert status == 400 and "2 values for shape [1, 4]" in message
    # A binary header that lies: more bytes claimed than sent, then fewer.
    tensor = {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 64}}
    body, headers = _binary_body({"inputs": [tensor]}, struct.pack("<4f", 1, 2, 3, 4))
    status, message = _error(_request(target, "POST", "/v2/models/simple/infer", body, headers))
    assert status == 400 and "binary_data_size 64" in message
    tensor["parameters"] = {"binary_data_size": 8}
    body, headers = _binary_body({"inputs": [tensor]}, struct.pack("<4f", 1, 2, 3, 4))
    status, message = _error(_request(target, "POST", "/v2/models/simple/infer", body, headers))
    assert status == 400 and "past what the inputs" in message
    status, message = _error(_request(target, "POST", "/v2/models/simple/infer", b"{}",
                                      {"Inference-Header-Content-Length": "900"}))
    assert status == 400 and "Inference-Header-Content-Length is 900" in message
    status, message = _error(_request(target, "POST", "/v2/models/simple/infer", b"x" * (LIMIT + 1)))
    assert status == 413


def test_a_body_shorter_than_its_content_length_leaves_the_node_serving(targets: list[str],
                                                                       nodes: list[NodeProcess]) -> None:
    host, port = targets[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"inputs\"")
        raw.shutdown(socket.SHUT_WR)
        answer = raw.recv(65536)
    assert answer == b"" or re.match(rb"HTTP/1\.[01] 400 ", answer)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"POST /v2/models/simple/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{\"inputs\": []}")
        # The body ends after 2 bytes (malformed JSON); the rest reads as a request line that is none: 400 both.
        assert re.match(rb"HTTP/1\.[01] 400 ", raw.recv(65536))
    assert _request(targets[0], "GET", "/v2/health/live")[0] == 200
    assert "unexpected error" not in nodes[0].log()  # every bad request above was expected, none a bug
