"""What a node tells its operators: Prometheus metrics named after ModelMesh's (no per-model labels),
and the smoothed load figures a node publishes in its instance record.

A leaf beside the layers: imports nothing else of meshnode.
"""
