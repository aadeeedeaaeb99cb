"""Triton's LogSettings over the root logger's level."""

from __future__ import annotations

import logging

import pytest
from tritonclient.grpc import service_pb2 as triton_pb

from meshnode.api.protocol_extras import level_after, log_settings
from meshnode.errors import InvalidInput, Unsupported

Value = triton_pb.LogSettingsRequest.SettingValue


def test_settings_describe_the_level() -> None:
    info = log_settings(logging.INFO, "json")
    assert info["log_info"].bool_param and info["log_error"].bool_param
    assert info["log_verbose_level"].uint32_param == 0 and info["log_format"].string_param == "json"
    warning = log_settings(logging.WARNING, "text")
    assert not warning["log_info"].bool_param and warning["log_warning"].bool_param
    assert log_settings(logging.DEBUG, "text")["log_verbose_level"].uint32_param == 1


@pytest.mark.parametrize(("level", "changes", "expected"), [
    (logging.INFO, {"log_verbose_level": Value(uint32_param=2)}, logging.DEBUG),
    (logging.DEBUG, {"log_verbose_level": Value(uint32_param=0)}, logging.INFO),
    (logging.INFO, {"log_info": Value(bool_param=False)}, logging.WARNING),
    (logging.INFO, {"log_info": Value(bool_param=False), "log_warning": Value(bool_param=False)}, logging.ERROR),
    (logging.ERROR, {"log_error": Value(bool_param=False)}, logging.CRITICAL),
    (logging.ERROR, {"log_info": Value(bool_param=True)}, logging.INFO),
])
def test_changes_move_the_level(level: int, changes: dict[str, object], expected: int) -> None:
    assert level_after(level, changes) == expected


def test_settings_that_cannot_change_or_do_not_exist_are_named() -> None:
    with pytest.raises(Unsupported, match="log_file"):
        level_after(logging.INFO, {"log_file": Value(string_param="x")})
    with pytest.raises(InvalidInput, match="log_colour"):
        level_after(logging.INFO, {"log_colour": Value(bool_param=True)})
    with pytest.raises(InvalidInput, match="log_info takes a bool_param"):
        level_after(logging.INFO, {"log_info": Value(uint32_param=1)})
