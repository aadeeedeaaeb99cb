"""The network between nodes and to sidecars: transport (the one place that creates gRPC servers and
channels, where TLS and interceptors plug in), direct_calls (ModelInfer of the threaded server taken off gRPC's C
core by its own polling threads) and direct_streams (ModelStreamInfer's calls there, by the same threads), tls
(credentials, re-read when their files change), proof (peers' HMAC with the mesh secret), peers (forwarding from
the event loop), threaded_peers (ModelInfer forwarded from the threaded server's polling threads, bytes in and
out), peer_load (the calls out to each peer and the suspects, shared by both) and the wire names of meshserve's
repository parameters.

A leaf beside the layers: may import only background and errors (plus meshpb, router, placement).
"""
