"""Overload on one node: a copy's run slots and queue, requests waiting for a load, the node's requests in flight.

The real dataplane, replica, cache and registry over a fake runtime whose model blocks each request until the
test releases it, so queues fill deterministically; a fake router (what the dataplane hands it) or the real
one (what the client gets).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.serving.dataplane import DataPlane
from meshpb import pb
from placement.types import LOADED
from router.errors import Overloaded
from router.hop import PARAMETER_KEY, Hop, Mode
from router.router import Router
from tests.unit.meshnode.fake_etcd import FakeStore
from tests.unit.meshnode.fakes import (
    ME,
    FakeRouter,
    LoadPlan,
    NodeParts,
    copy_state,
    node_view,
)
from tests.unit.router.fakes import FakePeers as RouterPeers

pytestmark = pytest.mark.timeout(10)

RUNS, QUEUED, MAX_INFLIGHT = 2, 3, 8


@dataclass
class Kit:
    node: NodeParts
    router: FakeRouter
    dataplane: DataPlane


async def kit_for(tmp_path: Path, *, max_inflight: int = MAX_INFLIGHT, mesh: bool = False,
                  router: Router | None = None) -> Kit:
    store = FakeStore()
    store.publish(node_view(ME))
    node = await NodeParts(store, tmp_path / "repo", runs_per_copy=RUNS, max_queued=QUEUED).start(mesh=mesh)
    fake = FakeRouter()
    dataplane = DataPlane(replica=node.replica, router=router or fake.router, cache=node.cache,
                          registry=node.registry, alias_targets={}, metadata_elsewhere=_no_metadata,
                          metrics=node.metrics, version="1", max_inflight=max_inflight)
    return Kit(node, fake, dataplane)


async def _no_metadata(name: str, version: str) -> pb.ModelMetadataResponse | None:
    return None


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    made = await kit_for(tmp_path)
    yield made
    await made.node.stop()


async def slow_copy(node: NodeParts, name: str = "m") -> asyncio.Event:
    """A loaded copy here whose requests block until the returned gate is set."""
    gate = asyncio.Event()
    node.runtime.plan(name, LoadPlan(infer_gate=gate))
    await node.register(name)
    await node.use(name)
    return gate


def send(dataplane: DataPlane, count: int, name: str = "m") -> list[asyncio.Task[pb.ModelInferResponse]]:
    return [asyncio.create_task(dataplane.infer(pb.ModelInferRequest(model_name=name, id=f"r{i}")))
            for i in range(count)]


def queue_delays(node: NodeParts) -> float:
    """Requests counted by the queue delay histogram (those that ran without waiting included)."""
    name = "modelmesh_req_queue_delay_milliseconds"
    for family in text_string_to_metric_families(node.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name + "_count":
                return sample.value
    raise AssertionError(f"{name} not rendered")


# -- a loaded copy: run slots, then a bounded queue -------------------------------------------------


async def test_a_copy_learns_its_run_time_from_requests_that_did_not_wait(kit: Kit) -> None:
    gate = await slow_copy(kit.node)
    entry = kit.node.cache.ready[("m", "")]
    gate.set()
    await kit.dataplane.infer(pb.ModelInferRequest(model_name="m", id="alone"))
    assert entry.run_s > 0


async def test_a_request_that_would_wait_past_its_deadline_goes_to_the_router_instead_of_the_queue(kit: Kit) -> None:
    node, dataplane = kit.node, kit.dataplane
    gate = await slow_copy(node)
    entry = node.cache.ready[("m", "")]
    entry.run_s = 0.2  # as measured on runs that did not wait
    blocked = send(dataplane, RUNS)  # both run slots busy: a next request waits about one run, then runs one
    await node.runtime.models["m@1"].requests.wait_len(RUNS)

    patient = asyncio.create_task(dataplane.infer(pb.ModelInferRequest(model_name="m", id="patient"),
                                                  time_remaining=lambda: 5.0))
    await node.runtime.models["m@1"].requests.wait_len(RUNS + 1)  # 0.1 s wait + 0.2 s run fit in 5 s: queued
    hurried = await dataplane.infer(pb.ModelInferRequest(model_name="m", id="hurried"), time_remaining=lambda: 0.25)

    assert hurried.id == "routed"  # about 0.4 s here (two ahead, then its own run) is past its 0.25 s left
    [routed] = kit.router.routed
    assert routed.overloaded_here is not None and routed.overloaded_here.startswith(
        "overloaded: model 'm' would answer in about 400 ms on node me (1 waiting before it), after the request's "
        "deadline (250 ms left)")
    gate.set()
    assert sorted(r.id for r in await asyncio.gather(*blocked, patient)) == ["patient", "r0", "r1"]



async def test_a_copy_runs_its_slots_queues_up_to_its_bound_then_hands_a_client_request_to_the_router(kit: Kit) -> None:
    node, dataplane = kit.node, kit.dataplane
    gate = await slow_copy(node)
    model = node.runtime.models["m@1"]
    entry = node.cache.ready[("m", "")]
    blocked = send(dataplane, RUNS + QUEUED)
    await model.requests.wait_len(RUNS + QUEUED)
    assert (entry.inflight, node.cache.queues.queued) == (RUNS + QUEUED, QUEUED)

    response = await dataplane.infer(pb.ModelInferRequest(model_name="m", id="extra"))

    assert response.id == "routed"  # the router tries the model's other copies (router/test_overload.py)
    [routed] = kit.router.routed
    assert routed.overloaded_here == ("overloaded: model 'm' has 3 requests waiting on node me, its limit "
                                      "(--max-queued-per-model 3)")
    assert len(model.requests) == RUNS + QUEUED and entry.inflight == RUNS + QUEUED  # nothing more admitted
    gate.set()
    assert sorted(r.id for r in await asyncio.gather(*blocked)) == ["r0", "r1", "r2", "r3", "r4"]
    assert (entry.inflight, node.cache.queues.queued, dataplane.inflight) == (0, 0, 0)
    # Two ran at once; three waited for a slot; the first use waited for the load.
    assert queue_delays(node) == RUNS + QUEUED + 1
    assert node.metrics.ran_without_waiting == RUNS


async def test_the_queue_frees_as_requests_finish_and_the_copy_takes_requests_again(kit: Kit) -> None:
    node, dataplane = kit.node, kit.dataplane
    gate = await slow_copy(node)
    blocked = send(dataplane, RUNS + QUEUED)
    await node.runtime.models["m@1"].requests.wait_len(RUNS + QUEUED)
    gate.set()
    await asyncio.gather(*blocked)
    gate.clear()
    again = send(dataplane, RUNS + QUEUED)
    await node.runtime.models["m@1"].requests.wait_len(2 * (RUNS + QUEUED))
    assert kit.router.routed == [] and node.cache.queues.queued == QUEUED
    gate.set()
    await asyncio.gather(*again)


# -- a loading copy: requests waiting for its load ----------------------------------------------------


async def wait_for_a_gated_load(node: NodeParts) -> tuple[asyncio.Event, list[asyncio.Task[pb.ModelInferResponse]]]:
    """QUEUED requests waiting for one load of 'm', which finishes once the returned event is set."""
    loaded = asyncio.Event()
    node.runtime.plan("m", LoadPlan(gate=loaded))
    await node.register("m")
    waiting = [asyncio.create_task(node.replica.infer(pb.ModelInferRequest(model_name="m", id=f"w{i}")))
               for i in range(QUEUED)]
    await node.runtime.loads.wait_len(1)  # started by the first, after each had started waiting for it
    return loaded, waiting


async def test_requests_waiting_for_a_load_are_bounded_and_the_excess_starts_no_other_load(kit: Kit) -> None:
    node = kit.node
    loaded, waiting = await wait_for_a_gated_load(node)
    assert node.cache.queues.queued == QUEUED

    with pytest.raises(Overloaded) as caught:
        await node.replica.infer(pb.ModelInferRequest(model_name="m"))

    assert str(caught.value) == ("overloaded: model 'm' has 3 requests waiting for its load on this node, its "
                                 "limit (--max-queued-per-model 3)")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert node.runtime.loads == ["m@1"]
    loaded.set()
    assert sorted(r.id for r in await asyncio.gather(*waiting)) == ["w0", "w1", "w2"]
    assert node.cache.queues.queued == 0
    assert queue_delays(node) == QUEUED and node.metrics.ran_without_waiting == 0  # each waited for the load


# -- the node: requests in flight ---------------------------------------------------------------------


async def test_past_max_inflight_the_node_refuses_any_request_at_once(tmp_path: Path) -> None:
    kit = await kit_for(tmp_path, max_inflight=RUNS + 1)
    try:
        node, dataplane = kit.node, kit.dataplane
        gate = await slow_copy(node)
        blocked = send(dataplane, RUNS + 1)
        await node.runtime.models["m@1"].requests.wait_len(RUNS + 1)

        with pytest.raises(Overloaded) as caught:
            await dataplane.infer(pb.ModelInferRequest(model_name="other"))

        assert str(caught.value) == ("overloaded: model 'other' was not served: node me has 3 requests in flight, "
                                     "its limit (--max-inflight 3)")
        assert kit.router.routed == [] and dataplane.inflight == RUNS + 1
        assert node.metrics.requests_rejected == 1
        gate.set()
        await asyncio.gather(*blocked)
        assert (await dataplane.infer(pb.ModelInferRequest(model_name="m", id="after"))).id == "after"
    finally:
        await kit.node.stop()


# -- with the real router: what a client and a peer get -------------------------------------------------


async def test_with_its_only_copy_full_a_model_is_refused_at_once_to_clients_and_peers_and_nothing_loads(
        tmp_path: Path) -> None:
    peers = RouterPeers()
    kit = await kit_for(tmp_path, mesh=True)
    try:
        node = kit.node
        router = Router(node.replica, node.mesh, peers, rng=random.Random(3))
        dataplane = DataPlane(replica=node.replica, router=router, cache=node.cache, registry=node.registry,
                              alias_targets={}, metadata_elsewhere=_no_metadata, metrics=node.metrics, version="1",
                              max_inflight=MAX_INFLIGHT)
        gate = await slow_copy(node)
        await node.recorded("m", lambda r: copy_state(r, ME) == LOADED)
        blocked = send(dataplane, RUNS + QUEUED)
        await node.runtime.models["m@1"].requests.wait_len(RUNS + QUEUED)

        with pytest.raises(Overloaded, match=r"^overloaded: model 'm': every copy \(me\) is at its limit of waiting "
                                             r"requests \(model 'm' has 3 requests waiting on node me"):
            await dataplane.infer(pb.ModelInferRequest(model_name="m"))
        from_peer = pb.ModelInferRequest(model_name="m")
        from_peer.parameters[PARAMETER_KEY].string_param = Hop(1, ("n1",), Mode.COPY).encode()
        with pytest.raises(Overloaded, match=r"^overloaded: model 'm' has 3 requests waiting on node me"):
            await dataplane.infer(from_peer)

        assert node.metrics.requests_rejected == 2
        assert node.runtime.loads == ["m@1"] and peers.calls == [] and dataplane.inflight == RUNS + QUEUED
        gate.set()
        await asyncio.gather(*blocked)
        assert (await dataplane.infer(pb.ModelInferRequest(model_name="m", id="after"))).id == "after"
    finally:
        await kit.node.stop()


async def test_a_request_that_stops_waiting_for_the_load_gives_its_place_to_the_next(kit: Kit) -> None:
    node = kit.node
    loaded, waiting = await wait_for_a_gated_load(node)
    waiting[0].cancel()  # its client's deadline passed
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    assert node.cache.queues.queued == QUEUED - 1

    waiting.append(asyncio.create_task(node.replica.infer(pb.ModelInferRequest(model_name="m", id="late"))))
    await asyncio.sleep(0)  # one step: it reaches the load and waits (a refusal would end it here)
    assert node.cache.queues.queued == QUEUED and not waiting[-1].done()
    loaded.set()
    assert sorted(r.id for r in await asyncio.gather(*waiting[1:])) == ["late", "w1", "w2"]
    assert node.cache.queues.queued == 0 and node.runtime.loads == ["m@1"]
