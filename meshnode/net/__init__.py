"""The network between nodes and to sidecars: transport (the one place that creates gRPC servers and
channels, where TLS and interceptors plug in), peers (forwarding, outstanding counts, suspects) and
the wire names of meshserve's repository parameters.

A leaf beside the layers: may import only background and errors (plus meshpb, router, placement).
"""
