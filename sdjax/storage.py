"""Where sdjax reads and writes files: local paths through the OS, URLs (gs://, s3://, any fsspec
protocol) through fsspec.

Local paths keep the OS's speed and guarantees (memory-mapped weights, atomic renames). Object stores
have neither, so:
- a file is written locally and uploaded as one object, which appears only once complete;
- a folder is uploaded beside a `PARTIAL` marker object, deleted last: a folder holding it was cut off
  (sdjax's loaders refuse it, and the training loop writes it again), while a folder a user copied in
  with other tools (no marker) reads as any other;
- files are read into memory in large chunks requested in parallel, not one request per tensor.
Orbax writes checkpoints to the same URLs itself (TensorStore for arrays, etils.epath for the rest),
with its own commit markers.

Why fsspec rather than etils.epath: it is what epath itself uses for gs:// when TensorFlow is absent,
and it exposes the ranged and concurrent reads and the plain object PUTs that this layer relies on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Callable, Iterator

# A folder holding this object is an upload that did not finish.
PARTIAL = ".sdjax-partial"
# Remote files are read in requests of this size, several at once.
CHUNK_BYTES = 64 << 20


class StorageError(ValueError):
    """A path cannot be read or written: no such bucket, no credentials, no permission, a cut-off upload."""


def is_remote(path: str) -> bool:
    """True for a URL of a remote store (gs://bucket/x, s3://..., memory://...); False for local paths
    and file:// URLs."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    """A local path as the OS takes it (file:// stripped)."""
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def join(path: str, *parts: str) -> str:
    """`path` / parts, with "/" for URLs and the OS's separator for local paths."""
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(local_path(path), *parts)


def parent(path: str) -> str:
    """The folder holding `path`."""
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(os.path.abspath(local_path(path)))


def absolute(path: str) -> str:
    """URLs as they are, local paths made absolute."""
    return path if is_remote(path) else os.path.abspath(local_path(path))


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str):
    import fsspec

    if protocol == "gs":
        # gcsfs's probe of the bucket type over gRPC waits out a timeout where that is not served (HNS and
        # zonal buckets need nothing of it here). Skipped unless the user set it. (NO_GCE_CHECK is left
        # alone: a TPU VM's credentials come from the metadata server it would skip.)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        # No listings cache: other processes (Orbax's TensorStore, the other hosts) write to the same store.
        return fsspec.filesystem(protocol, use_listings_cache=False)
    except (ImportError, ValueError) as e:
        package = {"gs": "gcsfs (pip install 'sdjax[gcs]')", "s3": "s3fs"}.get(protocol, f"fsspec's {protocol} support")
        raise StorageError(f"{protocol}:// paths need {package}: {e}") from None


def filesystem(path: str):
    """The fsspec filesystem serving URL `path`."""
    return _filesystem(str(path).split("://", 1)[0])


def exists(path: str) -> bool:
    return filesystem(path).exists(path) if is_remote(path) else os.path.exists(local_path(path))


def isfile(path: str) -> bool:
    return filesystem(path).isfile(path) if is_remote(path) else os.path.isfile(local_path(path))


def isdir(path: str) -> bool:
    return filesystem(path).isdir(path) if is_remote(path) else os.path.isdir(local_path(path))


def listdir(path: str) -> list[str]:
    """Names (not paths) in folder `path`, sorted; [] for a remote prefix holding nothing."""
    if not is_remote(path):
        return sorted(os.listdir(local_path(path)))
    try:
        entries = filesystem(path).ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def makedirs(path: str) -> None:
    """Creates local folder `path` (and parents); object stores need no folders."""
    if not is_remote(path):
        os.makedirs(local_path(path), exist_ok=True)


def remove(path: str) -> None:
    """Deletes file or folder `path` (recursively) if it exists; in a folder on a store, PARTIAL goes last,
    so a removal cut off part-way still reads as a cut-off upload."""
    if not is_remote(path):
        if os.path.isdir(local_path(path)):
            shutil.rmtree(local_path(path))
        elif os.path.lexists(local_path(path)):
            os.remove(local_path(path))
        return
    fs = filesystem(path)
    # Listed, then deleted object by object: fsspec's rm would read *, ? and [ in `path` as a pattern and
    # delete other folders' objects (a workdir named "exp[1]" would take "exp1" with it).
    objects = fs.find(path) if fs.isdir(path) else ([path] if fs.isfile(path) else [])
    objects.sort(key=lambda name: posixpath.basename(name) == PARTIAL)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(fs.rm_file, objects[:-1]))
    if objects:
        fs.rm_file(objects[-1])


def read_bytes(path: str) -> bytearray | bytes:
    """The whole file. Remote files come in CHUNK_BYTES requests made concurrently into one buffer, so a
    model file is held once and downloads at the store's parallel bandwidth."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    fs = filesystem(path)
    size = fs.size(path)
    if size <= CHUNK_BYTES:
        return fs.cat_file(path)
    buffer = bytearray(size)
    starts = list(range(0, size, CHUNK_BYTES))
    ends = [min(s + CHUNK_BYTES, size) for s in starts]
    # cat_ranges runs the requests concurrently (gcsfs, s3fs: asyncio); batches bound the memory in flight.
    batch = 8
    for i in range(0, len(starts), batch):
        parts = fs.cat_ranges([path] * len(starts[i:i + batch]), starts[i:i + batch], ends[i:i + batch])
        for start, part in zip(starts[i:i + batch], parts):
            if isinstance(part, Exception):
                raise part
            if len(part) != min(CHUNK_BYTES, size - start):  # e.g. the object was rewritten meanwhile
                raise StorageError(f"{path}: read {len(part)} bytes at offset {start} where "
                                   f"{min(CHUNK_BYTES, size - start)} were expected (did it change while read?)")
            buffer[start:start + len(part)] = part
    return buffer


def readable(path: str) -> str | io.BytesIO:
    """What a reader that takes a path or a binary file (PIL, torch.load) is given: a local file's path
    (it opens and reads it itself, lazily), or a remote file read whole into memory."""
    return io.BytesIO(read_bytes(path)) if is_remote(path) else path


def sha256(path: str, start: int = 0) -> str:
    """The hex SHA-256 of a file's bytes from offset `start` (a local file read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    if is_remote(path):
        digest.update(memoryview(read_bytes(path))[start:])
        return digest.hexdigest()
    with open(local_path(path), "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_range(path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (fewer where the file is shorter)."""
    if is_remote(path):
        return filesystem(path).cat_file(path, start, end)
    with open(local_path(path), "rb") as f:
        f.seek(start)
        return f.read(end - start)


def size(path: str) -> int:
    return filesystem(path).size(path) if is_remote(path) else os.path.getsize(local_path(path))


def read_text(path: str) -> str:
    data = read_bytes(path)
    return bytes(data).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file: one object on a store, a rename into place on a local disk (never half-written)."""
    with staged_file(path) as staging:
        with open(staging, "wb") as f:
            f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_file(path: str, suffix: str = "") -> Iterator[str]:
    """A local file to write; when the block succeeds it becomes `path` whole (renamed beside it on a
    local disk, uploaded as one object to a store); when it fails, nothing is left."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="sdjax-upload-") as tmp:
            staging = os.path.join(tmp, "file" + suffix)
            yield staging
            filesystem(path).put_file(staging, path)
        return
    path = os.path.abspath(local_path(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = os.path.join(os.path.dirname(path), f".sdjax-{uuid.uuid4().hex}{suffix}.partial")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def upload_folder(local: str, url: str, on_marker: Callable[[], None] | None = None) -> None:
    """Copies local folder `local` to `url` (which must hold nothing yet): PARTIAL first, then every file
    (concurrently), then PARTIAL is deleted. A cut-off upload leaves PARTIAL, never a folder that reads as
    complete. `on_marker` is called once PARTIAL is written (the fault tests kill the process there)."""
    fs = filesystem(url)
    marker = posixpath.join(url, PARTIAL)
    fs.pipe_file(marker, b"an sdjax upload that did not finish; delete this folder\n")
    if on_marker is not None:
        on_marker()
    sources, targets = [], []
    for root, _, files in os.walk(local):
        for name in files:
            source = os.path.join(root, name)
            sources.append(source)
            targets.append(posixpath.join(url, *os.path.relpath(source, local).split(os.sep)))
    if sources:
        fs.put(sources, targets)
    fs.rm_file(marker)


def check_complete(folder: str) -> None:
    """Raises StorageError if `folder` on a store is an upload that was cut off (see upload_folder)."""
    if is_remote(folder) and filesystem(folder).exists(posixpath.join(folder, PARTIAL)):
        raise StorageError(f"{folder}: an upload that did not finish (it holds {PARTIAL}); delete it and "
                           "write it again")


def is_complete_folder(folder: str) -> bool:
    """True for a folder that exists and is not a cut-off upload."""
    if not is_remote(folder):
        return os.path.isdir(local_path(folder))
    return isdir(folder) and not filesystem(folder).exists(posixpath.join(folder, PARTIAL))


@contextlib.contextmanager
def staged_folder(folder: str) -> Iterator[str]:
    """A local folder to write into; when the block succeeds its files become `folder` (renamed into place
    on a local disk; uploaded with upload_folder to a store); when it fails, nothing is left. `folder`
    must not exist yet, or be empty."""
    if is_remote(folder):
        if listdir(folder):
            raise StorageError(f"{folder}: already exists and is not empty; export into a new folder")
        with tempfile.TemporaryDirectory(prefix="sdjax-upload-") as tmp:
            yield tmp
            upload_folder(tmp, folder)
        return
    folder = os.path.abspath(local_path(folder))
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise StorageError(f"{folder}: already exists and is not empty; export into a new folder")
    parent_dir = os.path.dirname(folder)
    os.makedirs(parent_dir, exist_ok=True)
    # Made with mkdir rather than mkdtemp, so the export gets the mode any new folder gets (the umask's),
    # not mkdtemp's private 0700.
    staging = os.path.join(parent_dir, f".sdjax-export-{uuid.uuid4().hex}")
    os.mkdir(staging)
    try:
        yield staging
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_credentials(url: str) -> None:
    """For gs:// off the emulator: Application Default Credentials must exist (else gcsfs would fall back
    to anonymous access and fail later, or wait on a metadata server that is not there)."""
    if not url.startswith("gs://") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError:
        raise StorageError(f"{url}: gs:// paths need gcsfs (pip install 'sdjax[gcs]')") from None
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        raise StorageError(f"{url}: no Google Cloud credentials found (run `gcloud auth application-default "
                           "login`, or set GOOGLE_APPLICATION_CREDENTIALS; TPU VMs have their service "
                           "account's)") from None


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def check_readable(url: str, what: str) -> None:
    """Raises StorageError naming `what` (a flag or a file's role) unless remote `url` exists and can be
    read: credentials, bucket and object checked in that order, each failing in one line."""
    _check_credentials(url)
    fs = filesystem(url)
    try:
        if not fs.exists(url):
            bucket = _bucket(url)
            problem = (f"no such bucket {bucket!r}" if not fs.exists(url.split("://")[0] + "://" + bucket)
                       else "no such file or folder")
            raise StorageError(f"{what} {url}: {problem}")
    except StorageError:
        raise
    except Exception as e:  # gcsfs: OSError("Forbidden: ...") for 403, its HttpError for bad credentials
        raise StorageError(f"{what} {url}: cannot read ({_first_line(e)})") from None


def _first_line(error: Exception) -> str:
    """The error's type and the first line of its message (store clients give several)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def check_writable(url: str, what: str) -> None:
    """Raises StorageError naming `what` unless this process can write under remote `url`: checked by
    writing and deleting one small object, so a missing bucket, missing credentials or a read-only
    account fail now, in one line, and not after a compile."""
    _check_credentials(url)
    fs = filesystem(url)
    probe = posixpath.join(url, f".sdjax-write-check-{uuid.uuid4().hex}")
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError:
        raise StorageError(f"{what} {url}: no such bucket {_bucket(url)!r}") from None
    except Exception as e:  # gcsfs: OSError("Forbidden: ...") for 403, its HttpError for bad credentials
        raise StorageError(f"{what} {url}: cannot write ({_first_line(e)})") from None
