"""A local Google Cloud Storage (gcp-storage-emulator, in memory) for the tests of gs:// paths: started and
stopped by a fixture, no network. Every client sdjax uses is pointed at it through its own variable:
gcsfs (STORAGE_EMULATOR_HOST) and TensorStore, Orbax's array writer (TENSORSTORE_GCS_HTTP_URL).

Run as a script, this file is the emulator with one mend: its downloads lack the x-goog-generation header
that real GCS sends, and TensorStore's OCDBT (the format Orbax checkpoints in) reads an object's
generation from it, failing with "Malformed StorageGeneration" once a checkpoint holds a few hundred
arrays (seen with gcp-storage-emulator 2026.7.19)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """A running emulator: `env` holds the variables a client process needs, `bucket()` makes one."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--in-memory"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("the GCS emulator did not start")
                time.sleep(0.1)
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                    "NO_GCE_CHECK": "true"}

    def bucket(self, name: str) -> str:
        """Creates bucket `name`; returns "gs://name"."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request).close()
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name in `bucket` under `prefix`, from the emulator's own listing (not through gcsfs)."""
        names, token = [], None
        while True:
            query = {"prefix": prefix, **({"pageToken": token} if token else {})}
            url = f"{self.url}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            with urllib.request.urlopen(url) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _serve(argv: list[str]) -> None:
    """The emulator's own command line, its downloads answering with the object's generation headers."""
    from gcp_storage_emulator.handlers import objects

    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # not found: the handler answered 404 already
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download_with_generation
    from gcp_storage_emulator import __main__ as emulator  # after the mend: its routing table holds it

    emulator.main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
