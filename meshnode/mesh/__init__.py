"""This node's part in the mesh: the mesh view the router reads (live nodes, models and their copies,
load claims), copy bookkeeping and the dead-node janitor, the copy manager (extra and proactive
copies), drain hand-off, model metadata from peers, and the mesh-wide model counts (totals).

May import serving, state, etcd and the leaves; never control or api.
"""
