import asyncio
import time
import urllib.error
import urllib.request
from dataclasses import replace

import pytest

from meshnode.observability import endpoint as endpoint_mod
from meshnode.observability.endpoint import serve_metrics
from meshnode.observability.metrics import NodeMetrics, NodeState
from tests.unit.meshnode.observability.test_metrics import GAUGES, HISTOGRAMS, parse, samples, state


@pytest.mark.timeout(20)
async def test_gauges_follow_the_state_source() -> None:
    m = NodeMetrics()
    assert not GAUGES & set(parse(m.render()))

    calls = 0

    def source() -> NodeState:
        nonlocal calls
        calls += 1
        return replace(state(), capacity_bytes=0, used_bytes=0, lru_time_s=None)

    server = await serve_metrics(m, "127.0.0.1", 0, source)
    try:
        families = parse((await _get(f"http://127.0.0.1:{server.port}/metrics"))[2])
    finally:
        await server.close()

    assert calls == 1  # one snapshot per scrape, however many gauges read it
    assert "modelmesh_instance_lru_seconds" not in families
    assert samples(families["modelmesh_instance_lru_age_seconds"]) == {
        ("modelmesh_instance_lru_age_seconds", ""): 0
    }
    assert samples(families["modelmesh_instance_used_bps"]) == {("modelmesh_instance_used_bps", ""): 0}




async def _get(url: str) -> tuple[int, str, bytes]:
    def fetch() -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read()

    return await asyncio.to_thread(fetch)


async def _raw(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:  # the server dropped us with our bytes still unread
        return b""
    finally:
        writer.close()


@pytest.mark.timeout(20)
async def test_http_endpoint_serves_render_on_loopback() -> None:
    m = NodeMetrics()
    m.cache_hits = 3
    m.observe_load(2, 10)
    server = await serve_metrics(m, "127.0.0.1", 0, state)
    try:
        assert server.port > 0
        status, content_type, body = await _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        families = parse(body)
        assert set(families) >= HISTOGRAMS | GAUGES
        assert samples(families["modelmesh_cache_hit"]) == {("modelmesh_cache_hit_total", ""): 3}

        assert (await _get(f"http://127.0.0.1:{server.port}/other"))[0] == 404
        assert (await _get(f"http://127.0.0.1:{server.port}/metrics?x=1"))[0] == 200
        assert (await _raw(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
    finally:
        await server.close()


@pytest.mark.timeout(20)
async def test_garbage_requests_do_not_kill_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoint_mod, "_READ_TIMEOUT_S", 0.2)
    m = NodeMetrics()
    server = await serve_metrics(m, "127.0.0.1", 0)
    try:
        assert (await _raw(server.port, b"\x16\x03\x01\x00\xff\x00garbage\r\n\r\n")).startswith(
            b"HTTP/1.1 400"
        )
        assert (await _raw(server.port, b"GET\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert await _raw(server.port, b"A" * 20_000) == b""  # head over the limit: dropped
        assert await _raw(server.port, b"GET /metr") == b""  # stalls until the read timeout, then dropped
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HT")  # peer vanishes mid-request
        writer.close()

        status, _, body = await _get(f"http://127.0.0.1:{server.port}/metrics")
        assert status == 200 and b"modelmesh_invoke_model_total 0.0" in body
    finally:
        await server.close()


@pytest.mark.timeout(20)
async def test_failing_state_source_costs_one_scrape_and_close_drops_idle_peers() -> None:
    m = NodeMetrics()
    healthy = False

    def source() -> NodeState:
        if not healthy:
            raise RuntimeError("node state unavailable")
        return state()

    server = await serve_metrics(m, "127.0.0.1", 0, source)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert (await _get(f"http://127.0.0.1:{server.port}/metrics"))[0] == 500
        healthy = True
        assert (await _get(f"http://127.0.0.1:{server.port}/metrics"))[0] == 200
    finally:
        started = time.monotonic()
        await server.close()  # must not wait for the idle peer's read timeout
        assert time.monotonic() - started < 1
        assert await asyncio.wait_for(idle_reader.read(), 2) == b""
        idle_writer.close()
