"""The etcd client the node uses: a store (store: paged snapshot reads, leases, watches; over writes:
compare-and-set; over client: keys under a prefix, bounded retries), the watch stream, the lease keep-alive
(a task with a channel of its own, so no other etcd call queues ahead of it), watched prefixes (a dict kept
current by a watch), and the connection (endpoints with fail-over, TLS, authentication).

Knows keys and bytes, not records. May import only errors and net (the channel), and the router's error
root through errors.
"""
