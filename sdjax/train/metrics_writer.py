"""Training metrics to TensorBoard event files (written by tensorboardX, no TensorFlow) and `metrics.jsonl`.

`metrics.jsonl` gets one JSON object per `write_scalars` call: {"step": ..., "time": ..., **scalars}. JSON has no
NaN or infinity, so non-finite scalars are written there as `null` (the event file keeps the float as-is, and
TensorBoard shows it as NaN/inf).

Why tensorboardX: it is maintained and needs only protobuf and numpy. Its pieces are used synchronously
(EventsWriter, summary protos): its SummaryWriter queues events for a thread, and its flush() does not
wait for that queue, so an event written just before a kill or a read could be missing.

A logdir in a bucket (gs://...; object stores cannot append): the files are written in a local folder
and uploaded whole, at most every UPLOAD_SECONDS and at every `flush` (the training loop flushes at each
checkpoint) and `close`; a resumed run first downloads the metrics.jsonl it continues. So a killed run
loses at most the last UPLOAD_SECONDS of logs in the bucket, not its checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from types import TracebackType

import numpy as np
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

from sdjax import storage

EVENT_FILE_PREFIX = "events.out.tfevents"
JSONL_NAME = "metrics.jsonl"
RESERVED_JSON_KEYS = ("step", "time")
UPLOAD_SECONDS = 30.0


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tiles (N, H, W, C) images into one (rows*H, cols*W, C) image, row-major; empty cells are zeros.

    `cols` defaults to ceil(sqrt(N)), giving a near-square grid. The dtype is kept.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects (N, H, W, C) images, got shape {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    cols = math.ceil(math.sqrt(n)) if cols is None else min(cols, n)
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    rows = math.ceil(n / cols)
    padded = np.zeros((rows * cols, h, w, c), images.dtype)
    padded[:n] = images
    return padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _to_uint8_hwc(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (N, H, W, C) -> uint8 (H, W, C) with C in {1, 3, 4}; floats are taken as [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 4:
        image = image_grid(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, C) or (N, H, W, C) image with C in 1/3/4, got {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(np.nan_to_num(image.astype(np.float32)), 0, 1) * 255 + 0.5).astype(np.uint8)
    return image


def _json_safe(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricWriter:
    """Writes scalars and images for TensorBoard and scalars to `<logdir>/metrics.jsonl`.

    Every write is flushed to the OS straight away, so killing the process loses nothing already written.
    Each writer opens a new event file (a resumed run appends one beside the old ones; TensorBoard reads
    them all). With `enabled=False` (non-zero processes in multi-host training) no file is created and
    every method is a no-op.
    """

    def __init__(self, logdir: str, enabled: bool = True) -> None:
        self.logdir = logdir
        self.enabled = enabled
        self._events: EventsWriter | None = None
        self._jsonl = None
        self._local = None  # the local folder the files are written in, for a logdir in a bucket
        self._uploaded = 0.0
        if not enabled:
            return
        folder = logdir
        if storage.is_remote(logdir):
            folder = self._local = tempfile.mkdtemp(prefix="sdjax-logs-")
            remote_jsonl = storage.join(logdir, JSONL_NAME)
            if storage.exists(remote_jsonl):  # a resumed run continues its file
                with open(os.path.join(folder, JSONL_NAME), "wb") as f:
                    f.write(storage.read_bytes(remote_jsonl))
        os.makedirs(folder, exist_ok=True)
        # Named by the second and the host; the suffix keeps writers apart, in the order they started.
        self._events = EventsWriter(os.path.join(folder, "events"), filename_suffix=f".{time.time_ns()}.{os.getpid()}")
        self._jsonl = open(os.path.join(folder, JSONL_NAME), "a", encoding="utf-8")

    def _write(self, step: int, wall_time: float, summaries: list[Summary]) -> None:
        """One event holding every value of `summaries`, flushed to the OS."""
        if self._events is None:
            raise ValueError("MetricWriter is closed")
        values = [value for s in summaries for value in s.value]
        self._events.write_event(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))
        self._events.flush()
        self._upload(force=False)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Writes `scalars` at `step` to the event file and as one line of metrics.jsonl (non-finite -> null)."""
        if not self.enabled:
            return
        clash = [k for k in scalars if k in RESERVED_JSON_KEYS]
        if clash:
            raise ValueError(f"scalar names {clash} clash with metrics.jsonl's own keys {RESERVED_JSON_KEYS}")
        # float() also pulls numpy/JAX scalars to the host.
        values = {tag: float(value) for tag, value in scalars.items()}
        wall_time, step = time.time(), int(step)
        self._write(step, wall_time, [summary.scalar(tag, value) for tag, value in values.items()])
        record = {"step": step, "time": wall_time, **{t: _json_safe(v) for t, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._upload(force=False)

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Writes PNG images at `step`: (H, W), (H, W, C) or (N, H, W, C) (tiled with image_grid), C in 1/3/4.

        uint8 is taken as is; any other dtype as [0, 1] floats (clipped, NaN -> 0).
        """
        if not self.enabled:
            return
        pixels = {tag: _to_uint8_hwc(image) for tag, image in images.items()}  # every shape checked first
        self._write(int(step), time.time(), [summary.image(tag, image, dataformats="HWC")
                                             for tag, image in pixels.items()])

    def flush(self) -> None:
        """Pushes written data to disk (fsync), beyond the per-write flush to the OS."""
        if self._events is None:
            return
        self._events.flush()
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self._upload(force=True)

    def _upload(self, force: bool) -> None:
        """For a logdir in a bucket: copies the local files there whole (if `force` or UPLOAD_SECONDS passed)."""
        if self._local is None or (not force and time.monotonic() - self._uploaded < UPLOAD_SECONDS):
            return
        for name in sorted(os.listdir(self._local)):
            with open(os.path.join(self._local, name), "rb") as f:
                storage.write_bytes(storage.join(self.logdir, name), f.read())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        """Flushes and closes the files; calling it again does nothing."""
        if self._events is None:
            return
        self.flush()
        self._events.close()
        self._jsonl.close()
        self._events = None
        self._jsonl = None
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
