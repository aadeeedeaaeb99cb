"""The mesh's shared records, typed, each with a local view a watch keeps current: models (registry),
aliases, and node instances (this node's leased record and every node's view).

Reads are dict lookups; writes are compare-and-set through etcd and applied to the view at once.
May import etcd and the leaves.
"""
