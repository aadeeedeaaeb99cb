"""Paging of the management service's listings: name order, prefix, tokens, bounds."""

from __future__ import annotations

import pytest

from meshnode.aliases import AliasRecord
from meshnode.errors import InvalidInput
from meshnode.management import MAX_PAGE, page


def test_pages_follow_name_order_and_end_with_an_empty_token() -> None:
    names = [f"m{i:03d}" for i in range(250)][::-1]
    first, token = page(names, "", 100, "")
    assert first == [f"m{i:03d}" for i in range(100)] and token == "m099"
    second, token = page(names, "", 100, token)
    third, last = page(names, "", 100, token)
    assert second[0] == "m100" and third[-1] == "m249" and len(third) == 50 and last == ""


def test_prefix_filters_and_an_exact_final_page_has_no_token() -> None:
    names = ["a1", "a2", "b1", "a3", "ab"]
    assert page(names, "a", 4, "") == (["a1", "a2", "a3", "ab"], "")
    assert page(names, "a", 2, "") == (["a1", "a2"], "a2")
    assert page(names, "a", 2, "a2") == (["a3", "ab"], "")
    assert page(names, "zzz", 10, "") == ([], "")


def test_a_page_is_bounded_and_a_foreign_token_is_refused() -> None:
    chosen, token = page([f"{i:05d}" for i in range(5000)], "", 10**6, "")
    assert len(chosen) == MAX_PAGE and token
    assert len(page([f"{i}" for i in range(300)], "", 0, "")[0]) == 100  # 0: the default
    with pytest.raises(InvalidInput):
        page(["a1"], "a", 10, "b")


def test_alias_records_keep_fields_from_newer_versions() -> None:
    raw = b'{"alias":"front","model":"m1","auto_delete":true,"weights":{"m1":90,"m2":10}}'
    record = AliasRecord.from_json(raw)
    assert record.model == "m1" and record.auto_delete and record.extra == {"weights": {"m1": 90, "m2": 10}}
    assert AliasRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="alias"):
        AliasRecord.from_json(b'{"model":"m1"}')
