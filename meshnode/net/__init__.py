"""The network between nodes and to sidecars: transport (the one place that creates gRPC servers and
channels, where TLS and interceptors plug in), direct_calls (ModelInfer of the threaded server taken off gRPC's C
core by its own polling threads), tls (credentials, re-read when their files change),
proof (peers' HMAC with the mesh secret), peers (forwarding, outstanding counts, suspects) and the wire
names of meshserve's repository parameters.

A leaf beside the layers: may import only background and errors (plus meshpb, router, placement).
"""
