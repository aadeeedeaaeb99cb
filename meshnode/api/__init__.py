"""gRPC servicers: the inference protocol (Triton's wire path) and meshserve's management service.

Handlers only convert protobuf messages to and from the transport-neutral core (serving.dataplane,
control) and map errors to statuses in one place (api.status); api.access guards every handler (roles,
mesh membership, which decides whether a request's hop is honoured). A second transport (REST) belongs
beside them and calls the same core. May import control, serving, state, and the leaves (net, errors).
"""
