"""KServe v2 / Open Inference Protocol over HTTP/REST (Triton's HTTP endpoints), on aiohttp.

A thin transport: codec turns JSON and Triton's binary tensor extension into the same protobuf requests
the gRPC servicers take, and server calls those servicers' guarded handlers (api.inference,
api.protocol_extras through api.access), so routing, forwarding between nodes (gRPC), access, errors and
metrics are the gRPC path's own. May import what api may.
"""
