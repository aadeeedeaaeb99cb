"""Launchers of local processes for development, tests and benches: etcd, Triton, meshserve nodes,
and `meshserve local` (a whole mesh on loopback; with --tls, on throwaway certificates from local.certs).
Each raises LaunchError when its server does not start.

At the top beside cli; nothing on a node's request path imports it.
"""
