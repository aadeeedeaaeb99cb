"""Real stores for storage tests: moto's S3 server as a subprocess, and the standard library's HTTP server.

MotoS3 runs `moto_server` on a free 127.0.0.1 port with its request recorder on (the server's own log of
every request: method and URL), creates an IAM user whose key the tests use, and then turns IAM
authentication on, so a wrong key is refused as a real store refuses it. Reached only through botocore.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from meshnode.local.process import HOST, free_ports, terminate
from meshnode.storage.uris import StoreOptions

REGION = "us-east-1"
BUCKET = "models"
READY_TIMEOUT_S = 30.0
_ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query


class MotoS3:
    def __init__(self, workdir: Path, record: bool = True) -> None:
        """`record` False for large objects: the recorder writes every request's body to its log."""
        self.workdir = workdir
        self.record = record
        self.port = free_ports(1)[0]
        self.endpoint = f"http://{HOST}:{self.port}"
        self.recording = workdir / "moto-requests.jsonl"
        self.log_path = workdir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.key_id = ""
        self.secret = ""

    def start(self, authenticate: bool = True) -> None:
        """Starts the server (empty: moto keeps everything in memory), the user, the bucket, then auth."""
        env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(self.recording),
               "AWS_ACCESS_KEY_ID": "setup", "AWS_SECRET_ACCESS_KEY": "setup"}
        if self.record:
            env["MOTO_ENABLE_RECORDING"] = "1"
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([server, "-H", HOST, "-p", str(self.port)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait_ready()
        iam = self._client("iam", "setup", "setup")
        iam.create_user(UserName="meshserve")
        iam.put_user_policy(UserName="meshserve", PolicyName="all", PolicyDocument=_ALLOW_ALL)
        key = iam.create_access_key(UserName="meshserve")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=BUCKET)
        if authenticate:  # every request from now on is checked against IAM
            self._post("/moto-api/reset-auth", b"0")
        self.clear_requests()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited {self._proc.returncode}: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json",
                                                                      timeout=2):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server not ready after {READY_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            terminate(self._proc, timeout=10)
            self._proc = None

    def _post(self, path: str, body: bytes) -> None:
        # text/plain: under urllib's default form type, Flask would read the body as a form and leave none.
        request = urllib.request.Request(f"{self.endpoint}{path}", data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    def _client(self, service: str, key_id: str, secret: str) -> Any:
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key_id, aws_secret_access_key=secret)

    def client(self) -> Any:
        """A boto3 S3 client with the test user's key: for putting test objects."""
        return self._client("s3", self.key_id, self.secret)

    def options(self, **changes: Any) -> StoreOptions:
        """The node's store options for this server."""
        fields: dict[str, Any] = {"s3_endpoint_url": self.endpoint, "s3_region": REGION,
                                  "s3_access_key_id": self.key_id, "s3_secret_access_key": self.secret,
                                  "connect_timeout_s": 2.0}
        return StoreOptions(**{**fields, **changes})

    def put_files(self, prefix: str, files: dict[str, bytes]) -> None:
        s3 = self.client()
        for relative, content in files.items():
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{relative}" if prefix else relative, Body=content)

    def requests(self) -> list[Request]:
        """Every request the server received since the last clear_requests(), in order."""
        if not self.recording.exists():
            return []
        out = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            url = urllib.parse.urlsplit(entry["url"])
            out.append(Request(entry["method"], url.path + (f"?{url.query}" if url.query else "")))
        return out

    def object_gets(self) -> list[str]:
        """Paths of object reads (GET without a listing query)."""
        return [r.path for r in self.requests() if r.method == "GET" and "list-type" not in r.path
                and not r.path.endswith(f"/{BUCKET}") and "?" not in r.path]

    def clear_requests(self) -> None:
        self._post("/moto-api/recorder/reset-recording", b"")


@contextlib.contextmanager
def moto_s3(workdir: Path, record: bool = True) -> Iterator[MotoS3]:
    server = MotoS3(workdir, record)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files from a directory; under /truncated/ a file's headers promise all of it and the body stops at half."""

    def do_GET(self) -> None:
        if not self.path.startswith("/truncated/"):
            super().do_GET()
            return
        data = Path(self.directory, self.path.removeprefix("/truncated/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def do_HEAD(self) -> None:
        self.path = self.path.replace("/truncated/", "/", 1)
        super().do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read the files, not the access log


@contextlib.contextmanager
def http_files(directory: Path) -> Iterator[str]:
    """An HTTP server of `directory` on a free loopback port, in a thread; yields its base URL."""
    server = http.server.ThreadingHTTPServer((HOST, 0), functools.partial(_Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

