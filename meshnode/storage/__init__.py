"""Where model files are: the Triton-layout repository on disk, model sources (one version's files),
storage URIs, model stores reached through fsspec, the disk tier, and the one rule for a version's bytes on disk.

A leaf beside the layers: may import only errors.

Modules:
- repository: the local layout (ModelRepository, model_source, resolve_storage_uri, files_bytes).
- uris: parse_uri / StorageUri (scheme, shown form without credentials, cache key), StoreOptions (the node's
  --s3-endpoint-url, --s3-region, ... ; None falls back to the AWS variables and files), open_store.
- remote: ObjectStore(options): listing(uri) (sizes and ETags, no GET), fetch(uri, listing, dir) (download and
  verify), list_models(repo_uri) -> {name: model_uri}, write_model(store_uri, name, files) -> model_uri.
- store_errors: a store's failures as the node's errors: ModelNotFound, PermissionDenied, StorageUnavailable,
  LoadFailed; every message names the URI (never credentials).
- archives: extract(archive, dir, shown_uri): .tar.gz/.tgz/.zip, refusing members that would land outside.
- disk_cache: DiskCache(dir, max_bytes, clock): entries renamed into place whole, LRU eviction, pins, state
  kept across restarts.
- materializer: Materializer(store, cache).materialize(uri) -> local Path; `async with materialized(uri)`
  keeps the copy from eviction during a load; stats() -> StorageStats for the metrics.

Wiring, in the node:
    store = ObjectStore(StoreOptions(s3_endpoint_url=..., s3_region=...))
    cache = DiskCache(Path(disk_cache_dir), max_bytes=disk_cache_size)
    materializer = Materializer(store, cache)
    path = await materializer.materialize("s3://bucket/models/mlp")   # -> DIR/<key>/files (NAME/VERSION/...)
    models = await store.list_models("s3://bucket/models")             # {"mlp": "s3://bucket/models/mlp"}
    uri = await store.write_model("s3://bucket/models", "up", {"1/model.onnx": b"..."})
"""
