"""Storage URIs: what is local, what a message may show, the cache's name, and the options each store gets."""

from __future__ import annotations

import pytest

from meshnode.errors import InvalidInput
from meshnode.storage.uris import StoreOptions, open_store, parse_uri, shown_uri


@pytest.mark.parametrize(("text", "scheme", "local"), [
    ("/models/m", "", True),
    ("relative/m", "", True),
    ("file:///models/m", "file", True),
    ("s3://bucket/models/m", "s3", False),
    ("HTTPS://host/m.onnx", "https", False),
    ("gs://bucket/m", "gs", False),
])
def test_the_scheme_says_whether_a_model_is_used_in_place(text: str, scheme: str, local: bool) -> None:
    uri = parse_uri(text)
    assert (uri.scheme, uri.is_local) == (scheme, local)


@pytest.mark.parametrize(("text", "says"), [("", "empty"), ("s3://", "no bucket"), ("s3:///", "no bucket"),
                                           ("/a\x00b", r"^storage_uri '/a\\x00b' contains a NUL byte$")])
def test_a_uri_naming_no_location_is_invalid_input(text: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        parse_uri(text)


def test_credentials_and_a_presigned_query_never_show() -> None:
    text = "https://user:hunter2@host:8443/models/m.tgz?X-Amz-Signature=abc&X-Amz-Credential=AKIA"
    uri = parse_uri(text)
    assert uri.shown == "https://host:8443/models/m.tgz"
    assert "hunter2" not in repr(uri.shown) and "AKIA" not in uri.shown
    assert shown_uri("/a\x01b") == "/a\\x01b"


def test_the_cache_key_is_the_object_whatever_the_signature() -> None:
    first = parse_uri("https://host/m.tgz?X-Amz-Signature=1")
    second = parse_uri("https://host/m.tgz?X-Amz-Signature=2")
    assert first.cache_key == second.cache_key != parse_uri("https://host/other.tgz").cache_key


@pytest.mark.parametrize(("text", "basename", "archive"), [
    ("s3://bucket/models/mlp/", "mlp", False),
    ("s3://bucket/m.TGZ", "m.TGZ", True),
    ("https://host/a/m.tar.gz?sig=1", "m.tar.gz", True),
    ("/local/m.zip", "m.zip", True),
    ("s3://bucket", "model", False),
])
def test_basename_and_archive(text: str, basename: str, archive: bool) -> None:
    uri = parse_uri(text)
    assert (uri.basename, uri.is_archive) == (basename, archive)


def test_s3_options_pass_only_what_is_given() -> None:
    assert "key" not in StoreOptions().storage_options("s3")  # botocore reads the AWS variables and files
    options = StoreOptions(s3_endpoint_url="http://127.0.0.1:9000", s3_region="eu-west-3", s3_access_key_id="k",
                           s3_secret_access_key="s").storage_options("s3")
    assert options["endpoint_url"] == "http://127.0.0.1:9000"
    assert options["client_kwargs"] == {"region_name": "eu-west-3"}
    assert (options["key"], options["secret"]) == ("k", "s")
    assert options["use_listings_cache"] is False


def test_secrets_stay_out_of_the_options_repr() -> None:
    assert "topsecret" not in repr(StoreOptions(s3_secret_access_key="topsecret", s3_session_token="topsecret"))


def test_other_schemes_get_their_extra_options() -> None:
    options = StoreOptions(extra={"gs": {"token": "anon"}})
    assert options.storage_options("gs")["token"] == "anon"
    assert "token" not in options.storage_options("az")


def test_an_unknown_scheme_is_invalid_input_naming_it() -> None:
    with pytest.raises(InvalidInput, match="unsupported scheme 'nosuchstore'"):
        open_store(parse_uri("nosuchstore://bucket/m"), StoreOptions())
