"""This node's part in the mesh: the mesh view the router reads (live nodes, models and their copies,
load claims), copy bookkeeping and the dead-node janitor, the copy manager (extra and proactive
copies), drain hand-off, and model metadata from peers.

May import serving, state, etcd and the leaves; never control or api.
"""
