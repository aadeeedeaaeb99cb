"""Changing what the mesh serves: Triton's repository API (model control), meshserve's management
service, typed registrations read from the wire, alias switch-over and retirement of unaliased models.

Writes go to etcd through the state views; loads go through the local replica or a peer.
May import mesh, serving, state, etcd and the leaves.
"""
