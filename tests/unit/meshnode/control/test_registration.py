"""read_load / read_unregister: RepositoryModelLoad's wire parameters as typed commands, and what they refuse."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from meshnode.control.registration import CopyHere, Registration, read_load, read_unregister
from meshnode.errors import InvalidInput
from meshnode.net import params as wire

RUNTIME_RULE = 'config \'runtime\' must be one of onnxruntime, triton, or "" for any'
MIN_COPIES_RULE = "config 'min_copies' must be a whole number from 1 to 100"
TIMEOUT_RULE = "config 'load_timeout_s' must be a positive number of seconds"
TIMEOUT_MS_RULE = "config 'timeout_ms' must be a whole number of milliseconds from 1 to 4294967295"


def config(**fields: object) -> str:
    return json.dumps(fields)


def loaded(name: str = "m", **fields: Any) -> Registration:
    """The registration a RepositoryModelLoad reads: without ModelConfig fields, it drops any override."""
    return dataclasses.replace(Registration(name, config_override=""), **fields)


def test_a_peers_copy_request_is_a_copy_here_whatever_else_it_carries() -> None:
    assert read_load("m", {wire.COPY: True, "config": "not even json", wire.LAZY: True}) == CopyHere("m")


def test_no_parameters_register_the_model_by_name_and_load_it() -> None:
    assert read_load("m", {}) == loaded()
    assert read_load("m", {"config": "  "}) == loaded()  # an empty config is no config


def test_every_parameter_is_read_into_the_registration() -> None:
    parameters: dict[str, object] = {
        "file:1/model.onnx": b"weights", "file:config.pbtxt": b"name: 'm'", wire.LAZY: True, wire.SIZE_HINT: 123,
        "config": config(storage_uri="/models/m", runtime="triton", pinned=True, min_copies=2, load_timeout_s=30,
                         timeout_ms=250),
        "unrelated": "ignored",
    }
    assert read_load("m", parameters) == loaded(
        "m", storage_uri="/models/m", files={"1/model.onnx": b"weights", "config.pbtxt": b"name: 'm'"}, lazy=True,
        size_hint_bytes=123, pinned=True, min_copies=2, load_timeout_s=30.0, timeout_ms=250, runtime="triton")


@pytest.mark.parametrize(("parameters", "size_hint"), [
    ({wire.SIZE_HINT: 456}, 456),
    ({wire.SIZE_HINT: "456"}, 456),  # as a string parameter
    ({"config": config(size_hint=789)}, 789),
    ({wire.SIZE_HINT: 1, "config": config(size_hint=2)}, 1),  # the parameter beats the config
    ({wire.SIZE_HINT: -5}, None),
    ({wire.SIZE_HINT: "12MB"}, None),
    ({wire.SIZE_HINT: 1.5}, None),
    ({wire.SIZE_HINT: True}, None),
])
def test_a_size_hint_is_a_whole_number_of_bytes_or_none(parameters: dict[str, object], size_hint: int | None) -> None:
    registration = read_load("m", parameters)
    assert isinstance(registration, Registration) and registration.size_hint_bytes == size_hint


@pytest.mark.parametrize("value", ["true", 1, None])
def test_lazy_and_unregister_are_set_only_by_a_true_bool(value: object) -> None:
    assert read_load("m", {wire.LAZY: value}) == loaded(lazy=False)
    assert read_unregister({wire.UNREGISTER: value}) is False


def test_unregister_is_read_from_unloads_parameters() -> None:
    assert read_unregister({wire.UNREGISTER: True}) is True
    assert read_unregister({}) is False


@pytest.mark.parametrize(("fields", "expected"), [
    ({"runtime": ""}, loaded(runtime="")),  # any runtime
    ({"min_copies": 1}, loaded(min_copies=1)),
    ({"min_copies": 100}, loaded(min_copies=100)),
    ({"load_timeout_s": 0.5}, loaded(load_timeout_s=0.5)),
    ({"pinned": False}, loaded(pinned=False)),
    ({"timeout_ms": 1}, loaded(timeout_ms=1)),
    ({"timeout_ms": 4294967295}, loaded(timeout_ms=4294967295)),
    ({"timeout_ms": None}, loaded()),  # null is no value: the registration's stays
])
def test_keeping_fields_at_their_bounds_are_accepted(fields: dict[str, object], expected: Registration) -> None:
    assert read_load("m", {"config": json.dumps(fields)}) == expected


@pytest.mark.parametrize(("parameters", "message"), [
    ({"file:1/model.onnx": "text"}, "file: parameters must carry bytes"),
    ({"config": b"{}"}, "failed to load 'm': the 'config' parameter must be a JSON string"),
    ({"config": "[1, 2]"}, "failed to load 'm': the 'config' parameter must be a JSON object"),
    ({"config": config(runtime=5)}, RUNTIME_RULE),
    ({"config": config(runtime="tpu")}, RUNTIME_RULE),
    ({"config": config(pinned="yes")}, "config 'pinned' must be true or false"),
    ({"config": config(min_copies=0)}, MIN_COPIES_RULE),
    ({"config": config(min_copies=101)}, MIN_COPIES_RULE),
    ({"config": config(min_copies=1.5)}, MIN_COPIES_RULE),
    ({"config": config(min_copies=True)}, MIN_COPIES_RULE),
    ({"config": config(min_copies="2")}, MIN_COPIES_RULE),
    ({"config": config(load_timeout_s=0)}, TIMEOUT_RULE),
    ({"config": config(load_timeout_s=-1.0)}, TIMEOUT_RULE),
    ({"config": config(load_timeout_s=True)}, TIMEOUT_RULE),
    ({"config": config(load_timeout_s="5")}, TIMEOUT_RULE),
    ({"config": config(timeout_ms=0)}, TIMEOUT_MS_RULE),
    ({"config": config(timeout_ms=-250)}, TIMEOUT_MS_RULE),
    ({"config": config(timeout_ms=4294967296)}, TIMEOUT_MS_RULE),
    ({"config": config(timeout_ms=2.5)}, TIMEOUT_MS_RULE),
    ({"config": config(timeout_ms=250.0)}, TIMEOUT_MS_RULE),  # milliseconds are whole
    ({"config": config(timeout_ms=True)}, TIMEOUT_MS_RULE),
    ({"config": config(timeout_ms="250")}, TIMEOUT_MS_RULE),
])
def test_bad_parameters_are_invalid_input_saying_what_is_wrong(parameters: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        read_load("m", parameters)
    assert str(raised.value) == message


def test_config_that_is_not_json_says_where_it_fails() -> None:
    with pytest.raises(InvalidInput) as raised:
        read_load("m", {"config": '{"pinned": tru}'})
    assert str(raised.value) == ("failed to load 'm': the 'config' parameter is not valid JSON: Expecting value: "
                                 "line 1 column 12 (char 11)")


def test_a_registration_built_directly_is_held_to_the_same_rules() -> None:
    with pytest.raises(InvalidInput, match="^config 'min_copies' must be a whole number from 1 to 100$"):
        Registration("m", min_copies=0)
    with pytest.raises(InvalidInput, match=f"^{TIMEOUT_MS_RULE}$"):
        Registration("m", timeout_ms=0)
    assert Registration("m", pinned=True, runtime="").keeping() == {"pinned": True, "runtime": ""}
    assert Registration("m", timeout_ms=250).keeping() == {"timeout_ms": 250}
    assert Registration("m").keeping() == {}  # the management service's: the override stays
    assert Registration("m", config_override="").keeping() == {"config_override": ""}


@pytest.mark.parametrize(("raw", "says"), [
    ("[" * 100_000 + "]" * 100_000,
     r"^failed to load 'm': the 'config' parameter is not valid JSON: nested too deeply$"),
    ('{"a": 1%s}' % ("0" * 5000),
     r"^failed to load 'm': the 'config' parameter is not valid JSON: Exceeds the limit \(4300 digits\)"),
    ("{", r"^failed to load 'm': the 'config' parameter is not valid JSON: Expecting property name"),
    # Triton's model-control example: a fragment, not a JSON object
    ('"parameters": {"config": {{"max_batch_size": "16"}}}',
     r"^failed to load 'm': the 'config' parameter is not valid JSON: Extra data"),
])
def test_a_config_json_cannot_parse_is_invalid_input(raw: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        read_load("m", {"config": raw})


SIZE_HINT_RULE = r"^size_hint must be a whole number of bytes in ASCII digits, from 0 to 9223372036854775807$"


@pytest.mark.parametrize("hint", ["\u00b2", "\u0661\u0662", "9" * 5000, "9223372036854775808", 2**63, 2**70])
@pytest.mark.parametrize("where", ["parameter", "config"])
def test_a_size_hint_of_digits_int_refuses_or_beyond_int64_is_invalid_input(hint: str | int, where: str) -> None:
    parameters = {wire.SIZE_HINT: hint} if where == "parameter" else {"config": json.dumps({"size_hint": hint})}
    with pytest.raises(InvalidInput, match=SIZE_HINT_RULE):
        read_load("m", parameters)


@pytest.mark.parametrize("hint", ["9223372036854775807", 2**63 - 1, "0", "007"])
def test_a_size_hint_up_to_int64_is_read(hint: str | int) -> None:
    registration = read_load("m", {wire.SIZE_HINT: hint})
    assert isinstance(registration, Registration) and registration.size_hint_bytes == int(hint)


@pytest.mark.parametrize(("fields", "override"), [
    ({"max_batch_size": "16"}, '{"max_batch_size":"16"}'),  # int64 as a string, as protobuf's JSON form allows
    ({"maxBatchSize": 16, "storage_uri": "/models/m", "pinned": True}, '{"maxBatchSize":16}'),  # mixed with ours
    ({"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}], "sequence_batching": {}},
     '{"input":[{"name":"x","data_type":"TYPE_FP32","dims":[4]}],"sequence_batching":{}}'),
    ({"storage_uri": "/models/m"}, ""),  # only meshserve's keys: no override, the model's config.pbtxt again
    ({"runtime": "triton"}, ""),  # ModelConfig has a runtime too: meshserve's meaning wins
])
def test_model_config_fields_of_the_config_are_its_override(fields: dict[str, object], override: str) -> None:
    registration = read_load("m", {"config": json.dumps(fields)})
    assert isinstance(registration, Registration) and registration.config_override == override
    assert registration.keeping()["config_override"] == override


@pytest.mark.parametrize(("fields", "says"), [
    ({"max_batch_size": 16, "colour": "red"},
     "^failed to load 'm': the 'config' parameter has unknown field 'colour': neither a ModelConfig field nor one "
     "of storage_uri, runtime, min_copies, pinned, load_timeout_s, timeout_ms, size_hint$"),
    ({"max_batch_size": "sixteen"},
     r"^failed to load 'm': the 'config' parameter is not a valid model config: Failed to parse max_batch_size "
     r"field: invalid literal"),
    ({"input": 5}, "^failed to load 'm': the 'config' parameter is not a valid model config: Failed to parse input"),
    ({"max_batch_size": 2**70}, "^failed to load 'm': .* Value out of range"),
])
def test_an_override_model_config_refuses_is_invalid_input_naming_why(fields: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        read_load("m", {"config": json.dumps(fields)})

