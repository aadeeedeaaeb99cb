"""The etcd client the node uses: a store with compare-and-set writes and bounded retries, the watch
and lease keep-alive streams, and watched prefixes (a dict kept current by a watch).

Knows keys and bytes, not records. May import only errors (and the router's error root through it).
"""
