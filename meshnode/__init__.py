"""A meshserve node: serves the KServe v2 / Triton gRPC protocol for any model registered in the mesh.

Sub-packages are layers, each importing only those below it (tests/unit/test_architecture.py checks):

    cli, local, node.py   the `meshserve` command, process launchers, the composition root
    api                   gRPC servicers: convert messages, call one core, map errors to statuses
    control               model control (Triton's repository API), management, aliases' switch and retirement
    mesh                  this node in the mesh: shared copies and claims, copy manager, drain, peer metadata
    serving               the request path: dataplane (hit, else route), local replica, cache, load queue
    state                 typed records in etcd and their watched views: models, aliases, instances
    etcd                  the etcd client: compare-and-set store, watch and lease streams, watched prefixes

Beside them, usable from every layer: net (the one place making gRPC servers and channels; peers),
runtimes (ONNX Runtime, Triton), storage (where model files are), observability (metrics), errors,
settings, background. router/ and placement/ (pure: no I/O) sit below everything; see ARCHITECTURE.md.
"""
