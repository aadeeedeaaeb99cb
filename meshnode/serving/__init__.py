"""The request path on one node: the dataplane (a local hit, else the router), the local replica
(acquire a model here, run a request on it), the byte-capacity LRU cache with single-flight loads,
the priority load queue and the load-failure backoff; threaded_hits, a local hit answered on a gRPC
server's worker thread with its bookkeeping applied on the event loop; threaded_forwards, a client's request
forwarded from that thread to a peer's loaded copy.

A hit touches only this package and a runtime. May import state, etcd and the leaves; the router
(router/) is given to the dataplane by the composition root.
"""
