"""Where model files are: the Triton-layout repository on disk, model sources (one version's files),
storage URIs, and the one rule for a version's bytes on disk.

A leaf beside the layers: may import only errors.
"""
