"""The etcd client the node uses: a store with compare-and-set writes and bounded retries, the watch
stream, the lease keep-alive (on a thread of its own, so no work on the node's loop can starve it),
watched prefixes (a dict kept current by a watch), and the connection (endpoints with fail-over, TLS,
authentication).

Knows keys and bytes, not records. May import only errors and net (the channel), and the router's error
root through errors.
"""
