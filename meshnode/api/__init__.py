"""gRPC servicers: the inference protocol (Triton's wire path) and meshserve's management service.

Handlers only convert protobuf messages to and from the transport-neutral core (serving.dataplane,
control) and map errors to statuses in one place (api.status); api.access guards every handler (roles,
mesh membership, which decides whether a request's hop is honoured). A second transport (REST) belongs
beside them and calls the same core. api.threaded serves the gRPC ports on grpcio's threaded server
(--grpc-server threaded): local hits on its workers (serving.threaded_hits), every other call on the event loop
through the same handlers.
May import control, serving, state, and the leaves (net, errors).
"""
