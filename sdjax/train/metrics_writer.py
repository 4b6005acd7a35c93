"""Training metrics to TensorBoard event files and a `metrics.jsonl`, with no TensorFlow or tensorboard at runtime.

An event file is a TFRecord stream of `tensorboard.Event` protobufs. Each record is framed as

    uint64 length (little endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

and the first record carries only `file_version = "brain.Event:2"`. We hand-encode the few protobuf fields we need
(field numbers from tensorboard/compat/proto/event.proto and summary.proto):

    Event    { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary  { repeated Value value = 1; }
    Value    { string tag = 1; float simple_value = 2; Image image = 4; }
    Image    { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }

`metrics.jsonl` gets one JSON object per `write_scalars` call: {"step": ..., "time": ..., **scalars}. JSON has no
NaN or infinity, so non-finite scalars are written there as `null` (the event file keeps the float as-is, and
TensorBoard shows it as NaN/inf).
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import struct
import time
from types import TracebackType

import numpy as np
from PIL import Image

EVENT_FILE_PREFIX = "events.out.tfevents"
JSONL_NAME = "metrics.jsonl"
FILE_VERSION = "brain.Event:2"
RESERVED_JSON_KEYS = ("step", "time")

# --- CRC32C (Castagnoli), reflected polynomial 0x82F63B78 ---------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C of `data` (table-driven, one byte per step; fast enough for per-log-line records)."""
    table = _CRC32C_TABLE  # local name: avoids a global lookup per byte
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant, so CRCs of CRCs don't degenerate."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord-framed record holding `data`."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# --- Minimal protobuf encoding -------------------------------------------------------------------------------------

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 are encoded as their 64-bit two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(data)) + data


def _int_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _image_proto(png: bytes, height: int, width: int, channels: int) -> bytes:
    # colorspace follows the channel count: 1 grayscale, 3 RGB, 4 RGBA.
    return _int_field(1, height) + _int_field(2, width) + _int_field(3, channels) + _bytes_field(4, png)


def _scalar_value(tag: str, value: float) -> bytes:
    return _bytes_field(1, tag.encode()) + _key(2, _FIXED32) + struct.pack("<f", value)


def _image_value(tag: str, image_proto: bytes) -> bytes:
    return _bytes_field(1, tag.encode()) + _bytes_field(4, image_proto)


def _event(wall_time: float, step: int, *, file_version: str | None = None, values: list[bytes] | None = None) -> bytes:
    out = _key(1, _FIXED64) + struct.pack("<d", wall_time) + _int_field(2, step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if values:
        out += _bytes_field(5, b"".join(_bytes_field(1, v) for v in values))
    return out


# --- Images --------------------------------------------------------------------------------------------------------


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


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, C) image, C in {1, 3, 4}."""
    pixels = image[:, :, 0] if image.shape[-1] == 1 else image  # pillow wants grayscale as 2-D
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Writer --------------------------------------------------------------------------------------------------------


def _json_safe(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _open_new_event_file(logdir: str) -> tuple[str, io.BufferedWriter]:
    """Creates a fresh event file; never reuses one, so a resumed run appends a new file next to the old ones.

    TensorBoard reads every file whose name contains "tfevents", in name order; the zero-padded time keeps name
    order chronological. The pid and counter avoid clashes between runs started within the same second.
    """
    stem = f"{EVENT_FILE_PREFIX}.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    for counter in range(1000):
        path = os.path.join(logdir, f"{stem}.{counter}")
        try:
            return path, open(path, "xb")
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new event file named {stem}.* in {logdir}")


class MetricWriter:
    """Writes scalars and images for TensorBoard and scalars to `<logdir>/metrics.jsonl`.

    Every write is flushed to the OS straight away, so killing the process loses nothing already written.
    With `enabled=False` (non-zero processes in multi-host training) no file is created and every method is a no-op.
    """

    def __init__(self, logdir: str, enabled: bool = True) -> None:
        self.logdir = logdir
        self.enabled = enabled
        self.event_path: str | None = None
        self._events: io.BufferedWriter | None = None
        self._jsonl: io.TextIOWrapper | None = None
        if not enabled:
            return
        os.makedirs(logdir, exist_ok=True)
        self.event_path, self._events = _open_new_event_file(logdir)
        self._jsonl = open(os.path.join(logdir, JSONL_NAME), "a", encoding="utf-8")
        self._write_event(_event(time.time(), 0, file_version=FILE_VERSION))

    def _write_event(self, event: bytes) -> None:
        if self._events is None:
            raise ValueError("MetricWriter is closed")
        self._events.write(tfrecord(event))
        self._events.flush()

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Writes `scalars` at `step` to the event file and as one line of metrics.jsonl (non-finite -> null)."""
        if not self.enabled:
            return
        clash = [k for k in scalars if k in RESERVED_JSON_KEYS]
        if clash:
            raise ValueError(f"scalar names {clash} clash with metrics.jsonl's own keys {RESERVED_JSON_KEYS}")
        # float() also pulls numpy/JAX scalars to the host.
        values = {tag: float(value) for tag, value in scalars.items()}
        wall_time = time.time()
        step = int(step)
        self._write_event(_event(wall_time, step, values=[_scalar_value(t, v) for t, v in values.items()]))
        record = {"step": step, "time": wall_time, **{t: _json_safe(v) for t, v in values.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """Writes PNG images at `step`: (H, W), (H, W, C) or (N, H, W, C) (tiled with image_grid).

        uint8 is taken as is; any other dtype as [0, 1] floats (clipped, NaN -> 0).
        """
        if not self.enabled:
            return
        values = []
        for tag, image in images.items():
            pixels = _to_uint8_hwc(image)
            height, width, channels = pixels.shape
            values.append(_image_value(tag, _image_proto(encode_png(pixels), height, width, channels)))
        self._write_event(_event(time.time(), int(step), values=values))

    def flush(self) -> None:
        """Pushes written data to disk (fsync), beyond the per-write flush to the OS."""
        for f in (self._events, self._jsonl):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        """Flushes and closes the files; calling it again does nothing."""
        if self._events is None:
            return
        self.flush()
        self._events.close()
        self._jsonl.close()
        self._events = None
        self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
