"""gRPC servicers: the inference protocol (Triton's wire path) and meshserve's management service.

Handlers only convert protobuf messages to and from the transport-neutral core (serving.dataplane,
control) and map errors to statuses in one place (api.status); api.access guards every handler (roles,
mesh membership, which decides whether a request's hop is honoured). A second transport (REST) belongs
beside them and calls the same core. api.threaded serves the gRPC ports on grpcio's threaded server
(--grpc-server threaded), every call on the event loop through the same handlers, but ModelInfer: api.direct
answers its local hits, and forwards a client's request to a peer's loaded copy, on the polling thread that took
the call off gRPC's C core (serving.threaded_hits, serving.threaded_forwards, net.direct_calls), and the rest on
the event loop; and ModelStreamInfer: api.direct_stream runs its handler on the event loop while those polling
threads read and write its messages (net.direct_streams); api.threaded_lane holds those parts as one.
May import control, serving, state, and the leaves (net, errors).
"""
