"""Paging of the management service's listings: name order, prefix, tokens, bounds, updates."""

from __future__ import annotations

import random

import pytest

from meshnode.control.management import MAX_PAGE, SortedNames
from meshnode.errors import InvalidInput
from meshnode.state.aliases import AliasRecord


def test_pages_follow_name_order_and_end_with_an_empty_token() -> None:
    names = SortedNames(f"m{i:03d}" for i in reversed(range(250)))
    first, token = names.page("", 100, "")
    assert first == [f"m{i:03d}" for i in range(100)] and token == "m099"
    second, token = names.page("", 100, token)
    third, last = names.page("", 100, token)
    assert second[0] == "m100" and third[-1] == "m249" and len(third) == 50 and last == ""


def test_prefix_filters_and_an_exact_final_page_has_no_token() -> None:
    names = SortedNames(["a1", "a2", "b1", "a3", "ab", "_x", "zz"])
    assert names.page("a", 4, "") == (["a1", "a2", "a3", "ab"], "")
    assert names.page("a", 2, "") == (["a1", "a2"], "a2")
    assert names.page("a", 2, "a2") == (["a3", "ab"], "")
    assert names.page("zzz", 10, "") == ([], "")


def test_a_page_is_bounded_and_a_foreign_token_is_refused() -> None:
    chosen, token = SortedNames(f"{i:05d}" for i in range(5000)).page("", 10**6, "")
    assert len(chosen) == MAX_PAGE and token
    assert len(SortedNames(f"{i}" for i in range(300)).page("", 0, "")[0]) == 100  # 0: the default
    with pytest.raises(InvalidInput):
        SortedNames(["a1"]).page("a", 10, "b")


def test_updates_keep_the_order_as_a_fresh_sort_would() -> None:
    rng = random.Random(7)
    present: set[str] = set()
    names = SortedNames([])
    for _ in range(3000):
        name = f"m{rng.randrange(400)}"
        keep = rng.random() < 0.6
        names.update(name, keep)
        (present.add if keep else present.discard)(name)
    listed: list[str] = []
    token = ""
    while True:
        page, token = names.page("m", 37, token)
        listed += page
        if not token:
            break
    assert listed == sorted(present)


def test_alias_records_keep_fields_from_newer_versions() -> None:
    raw = b'{"alias":"front","model":"m1","auto_delete":true,"weights":{"m1":90,"m2":10}}'
    record = AliasRecord.from_json(raw)
    assert record.model == "m1" and record.auto_delete and record.extra == {"weights": {"m1": 90, "m2": 10}}
    assert AliasRecord.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="alias"):
        AliasRecord.from_json(b'{"model":"m1"}')
