"""What a node tells its operators: Prometheus metrics named after ModelMesh's (bounded labels) and their
/metrics endpoint, OpenTelemetry traces of the request path, log lines carrying trace ids, and the smoothed
load figures a node publishes in its instance record.

A leaf beside the layers: imports nothing else of meshnode (router's errors and hop, which are pure, only).
"""
