"""Pulling a model from object storage: meshserve's materialize against a bare s3fs download, same run.

`.venv/bin/python -m bench.pull` starts moto's S3 server (a process on a free loopback port, IAM auth on),
uploads a ~50 MB ONNX model both as a Triton directory and as a .tar.gz, then interleaves rounds of:
- bare: s3fs's get of the same objects into a fresh directory (the floor: no listing, no checks); for the
  directory also s3fs's recursive get of the prefix (what an s3fs user runs: its listing included), for
  the archive also the get plus tarfile's extraction with no filter (the floor of pull+extract);
- pull: Materializer.materialize into an empty disk cache (listing, download, size and MD5 checks, rename;
  for the archive, extraction too);
- hit: materialize again, the copy on disk (one listing, no download);
and, per path, the ONNX Runtime session create from the local files (a load), so pull+load and hit+load
read as what a cold request waits for. Prints medians (min-max) and the ratios pull/bare (goal <= 1.2x)
and hit/pull, after one warm-up round. `--quick` (1 MB, one round) is for a smoke test; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime as ort
import s3fs

from bench.floor import create_session
from deploy.local.models import write_mlp
from meshnode.storage.disk_cache import DiskCache
from meshnode.storage.materializer import Materializer
from meshnode.storage.remote import ObjectStore
from tests.integration.s3_server import BUCKET, MotoS3

GOAL = 1.2  # pull / bare
T = TypeVar("T")


def _upload(s3: MotoS3, work: Path, approx_bytes: int) -> dict[str, bytes]:
    write_mlp(work / "src", "mlp", approx_bytes=approx_bytes)
    model_dir = work / "src" / "mlp"
    files = {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    s3.put_files("bench/mlp", files)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        tar.add(model_dir, arcname="mlp")
    s3.put_files("bench", {"mlp.tar.gz": out.getvalue()})
    return files


def _timed(action: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def _load_s(model_file: Path) -> float:
    return _timed(lambda: create_session(model_file))[0]


def _bare_fs(s3: MotoS3) -> s3fs.S3FileSystem:
    options = s3.options()
    return s3fs.S3FileSystem(endpoint_url=options.s3_endpoint_url, key=options.s3_access_key_id,
                             secret=options.s3_secret_access_key, client_kwargs={"region_name": options.s3_region},
                             skip_instance_cache=True)


def _bare_s(fs: s3fs.S3FileSystem, keys: list[str], target: Path) -> tuple[float, float]:
    """Seconds of s3fs's get of `keys`, and of that plus tarfile's plain extraction for an archive."""
    local = [target / key for key in keys]
    for path in local:
        path.parent.mkdir(parents=True, exist_ok=True)
    seconds = _timed(lambda: fs.get([f"{BUCKET}/{key}" for key in keys], [str(p) for p in local]))[0]
    extract_s = 0.0
    if local[0].name.endswith(".tar.gz"):
        def extract() -> None:
            with tarfile.open(local[0], "r:gz") as tar:
                tar.extractall(target / "x", filter="fully_trusted")
        extract_s = _timed(extract)[0]
    shutil.rmtree(target)
    return seconds, seconds + extract_s


def _bare_listed_s(fs: s3fs.S3FileSystem, prefix: str, target: Path) -> float:
    """Seconds of s3fs's recursive get of a prefix: what a bare s3fs user does, listing included."""
    seconds = _timed(lambda: fs.get(f"{BUCKET}/{prefix}", str(target), recursive=True))[0]
    assert (target / "1" / "model.onnx").is_file()
    shutil.rmtree(target)
    return seconds


def _materialize(materializer: Materializer, uri: str) -> Path:
    return asyncio.run(materializer.materialize(uri))


def _round(fs: s3fs.S3FileSystem, s3: MotoS3, work: Path, files: dict[str, bytes]) -> dict[str, float]:
    """One round of every path. Both clients are made once, before the rounds: no round pays for a session."""
    out: dict[str, float] = {}
    for kind, key, objects in (("dir", "bench/mlp", [f"bench/mlp/{name}" for name in files]),
                               ("tgz", "bench/mlp.tar.gz", ["bench/mlp.tar.gz"])):
        out[f"{kind}_bare_s"], bare_all = _bare_s(fs, objects, work / f"bare-{kind}")
        if kind == "tgz":
            out["tgz_bare_extract_s"] = bare_all
        else:
            out["dir_bare_listed_s"] = _bare_listed_s(fs, key, work / "bare-listed")
        cache_dir = work / f"cache-{kind}"
        materializer = Materializer(ObjectStore(s3.options()), DiskCache(cache_dir))
        uri = f"s3://{BUCKET}/{key}"
        for step in ("pull", "hit"):
            seconds, model = _timed(functools.partial(_materialize, materializer, uri))
            out[f"{kind}_{step}_s"] = seconds
            out[f"{kind}_{step}_load_s"] = seconds + _load_s(model / "1" / "model.onnx")
        assert (materializer.stats().misses, materializer.stats().hits) == (1, 1)
        shutil.rmtree(cache_dir)
    return out


def _summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    keys = rounds[0].keys()
    medians = {k: statistics.median(r[k] for r in rounds) for k in keys}
    ranges = {k: (min(r[k] for r in rounds), max(r[k] for r in rounds)) for k in keys}
    ratios: dict[str, float] = {}
    for kind in ("dir", "tgz"):
        ratios[f"{kind}_pull_over_bare"] = medians[f"{kind}_pull_s"] / medians[f"{kind}_bare_s"]
        ratios[f"{kind}_hit_over_pull"] = medians[f"{kind}_hit_s"] / medians[f"{kind}_pull_s"]
    ratios["dir_pull_over_bare_listed"] = medians["dir_pull_s"] / medians["dir_bare_listed_s"]
    ratios["tgz_pull_over_bare_extract"] = medians["tgz_pull_s"] / medians["tgz_bare_extract_s"]
    return {"medians_s": medians, "ranges_s": ranges, "ratios": ratios, "goal_pull_over_bare": GOAL,
            "rounds": rounds}


def _print(summary: dict[str, Any], model_bytes: int) -> None:
    med, rng, ratios = summary["medians_s"], summary["ranges_s"], summary["ratios"]
    load = summary["load_average"]
    print(f"model: {model_bytes / 1e6:.1f} MB ONNX; {len(summary['rounds'])} rounds; load average "
          f"{load['before']:.2f} -> {load['after']:.2f}; medians (min-max), ms")
    for key in med:
        print(f"  {key:<16} {med[key] * 1e3:9.1f}  ({rng[key][0] * 1e3:.1f}-{rng[key][1] * 1e3:.1f})")
    for kind in ("dir", "tgz"):
        ratio = ratios[f"{kind}_pull_over_bare"]
        verdict = "PASS" if ratio <= GOAL else "MISS"
        print(f"  {kind}: pull/bare {ratio:.2f}x (goal <= {GOAL}x: {verdict}); "
              f"hit/pull {ratios[f'{kind}_hit_over_pull']:.3f}x")
    print(f"  dir: pull / s3fs recursive get (its listing included) {ratios['dir_pull_over_bare_listed']:.2f}x")
    print(f"  tgz: pull+extract / (bare get + plain tarfile extract) {ratios['tgz_pull_over_bare_extract']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--megabytes", type=float, default=50.0)
    parser.add_argument("--quick", action="store_true", help="1 MB, one round: a smoke test")
    parser.add_argument("--json", action="store_true", help="the whole result as JSON on stdout")
    args = parser.parse_args(argv)
    rounds, megabytes = (1, 1.0) if args.quick else (args.rounds, args.megabytes)
    ort.set_default_logger_severity(3)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        work = Path(tmp)
        s3 = MotoS3(work, record=False)
        try:
            s3.start()
            files = _upload(s3, work, int(megabytes * 1e6))
            fs = _bare_fs(s3)
            _round(fs, s3, work, files)  # warm-up, not counted: sessions, connections, page cache
            results = []
            for index in range(rounds):
                print(f"round {index + 1}/{rounds}", file=sys.stderr)
                results.append(_round(fs, s3, work, files))
        finally:
            s3.stop()
    summary = _summary(results)
    summary["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    summary["model_bytes"] = sum(len(d) for d in files.values())
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary, summary["model_bytes"])


if __name__ == "__main__":
    main()
