"""MetricWriter writes event files that tensorboard's own readers accept, plus metrics.jsonl; Progress wraps tqdm."""

import glob
import io
import json
import math
import os
import socket
import time

import numpy as np
import pytest
from PIL import Image

from sdjax.train.metrics_writer import MetricWriter, image_grid
from sdjax.train.progress import Progress

pytestmark = pytest.mark.compat  # also run under the newest jax (CI phase 2)


def _accumulator(logdir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(
        logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})  # 0 = keep all
    acc.Reload()
    return acc


def _raw_events(path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    return list(loader.RawEventFileLoader(path).Load())


def _event_files(logdir):
    return sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))


def _read_jsonl(logdir):
    with open(os.path.join(logdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- Event files read back by tensorboard ----------------------------------------------------------------------------


def test_scalars_round_trip_through_tensorboard(tmp_path):
    logdir = str(tmp_path / "run")
    written = {step: {"loss": 1.0 / step, "lr": 1e-4 * step, "grad_norm": -3.25 * step} for step in (1, 10, 2**40)}
    with MetricWriter(logdir) as writer:
        for step, scalars in written.items():
            writer.write_scalars(step, scalars)
        writer.write_scalars(7, {"nan_metric": float("nan"), "inf_metric": float("inf")})

    acc = _accumulator(logdir)
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "grad_norm", "nan_metric", "inf_metric"}
    for tag in ("loss", "lr", "grad_norm"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(written)
        # simple_value is a float32 field.
        assert [e.value for e in events] == [float(np.float32(s[tag])) for s in written.values()]
    assert [e.step for e in acc.Scalars("nan_metric")] == [7]
    assert math.isnan(acc.Scalars("nan_metric")[0].value)
    assert acc.Scalars("inf_metric")[0].value == math.inf


def test_event_fields_decode_with_tensorboard_protos(tmp_path):
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    logdir = str(tmp_path)
    before = time.time()
    with MetricWriter(logdir) as writer:
        writer.write_scalars(-5, {"a": 0.5})  # negative steps are valid int64s
        writer.write_scalars(3, {"b": 2.0, "c": 4.0})
    (path,) = _event_files(logdir)
    events = [event_pb2.Event.FromString(raw) for raw in _raw_events(path)]
    assert events[0].file_version == "brain.Event:2"
    assert not events[0].HasField("summary")
    assert [e.step for e in events[1:]] == [-5, 3]
    assert [[(v.tag, v.simple_value) for v in e.summary.value] for e in events[1:]] == [[("a", 0.5)],
                                                                                        [("b", 2.0), ("c", 4.0)]]
    assert all(before <= e.wall_time <= time.time() for e in events)


def _decode_png(data):
    return np.asarray(Image.open(io.BytesIO(data)))


def test_images_round_trip_through_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    float_image = rng.random((12, 20, 3), dtype=np.float32)
    uint8_image = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # noise: a ~50 KB PNG
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_images(100, {"float": float_image, "uint8": uint8_image, "grid": batch})
        writer.write_images(200, {"float": 1 - float_image, "big": big})

    acc = _accumulator(str(tmp_path))
    assert set(acc.Tags()["images"]) == {"float", "uint8", "grid", "big"}
    expected = {
        "float": [(100, (float_image * 255 + 0.5).astype(np.uint8)),
                  (200, ((1 - float_image) * 255 + 0.5).astype(np.uint8))],
        "uint8": [(100, uint8_image)],
        "grid": [(100, image_grid(batch))],
        "big": [(200, big)],
    }
    for tag, wanted in expected.items():
        events = acc.Images(tag)
        assert [e.step for e in events] == [step for step, _ in wanted]
        for event, (_, pixels) in zip(events, wanted):
            assert (event.height, event.width) == pixels.shape[:2]
            np.testing.assert_array_equal(_decode_png(event.encoded_image_string), pixels)
    assert acc.Images("grid")[0].width == 3 * 6 and acc.Images("grid")[0].height == 2 * 4


def test_grayscale_and_rgba_images(tmp_path):
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgba = np.full((2, 2, 4), 0.5, np.float32)
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_images(1, {"gray": gray, "rgba": rgba})
    (path,) = _event_files(str(tmp_path))
    values = [v for raw in _raw_events(path)[1:] for v in event_pb2.Event.FromString(raw).summary.value]
    assert values[0].image.colorspace == 3 and values[1].image.colorspace == 4  # gray is stored as RGB
    np.testing.assert_array_equal(_decode_png(values[0].image.encoded_image_string), np.stack([gray] * 3, -1))
    rgba_back = _decode_png(values[1].image.encoded_image_string)
    np.testing.assert_array_equal(rgba_back, np.full((2, 2, 4), 128))


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(1, 6)])
    grid = image_grid(images, cols=2)
    assert grid.shape == (3 * 2, 2 * 3, 3)
    cells = grid.reshape(3, 2, 2, 3, 3)[:, 0, :, 0, 0]  # (rows, H, cols, W, C) -> each cell's fill value
    np.testing.assert_array_equal(cells, [[1, 2], [3, 4], [5, 0]])
    assert image_grid(images).shape == (2 * 2, 3 * 3, 3)  # default: ceil(sqrt(5)) = 3 columns
    assert image_grid(images, cols=10).shape == (2, 5 * 3, 3)
    with pytest.raises(ValueError):
        image_grid(images[0])


def test_bad_image_shape_raises(tmp_path):
    with MetricWriter(str(tmp_path)) as writer, pytest.raises(ValueError):
        writer.write_images(0, {"bad": np.zeros((4, 4, 2))})


# --- metrics.jsonl, flushing, resuming, disabled writers -------------------------------------------------------------


def test_jsonl_lines(tmp_path):
    before = time.time()
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"loss": np.float32(0.25), "lr": 1e-4})
        writer.write_scalars(2, {"loss": float("nan"), "grad_norm": float("-inf")})
    lines = _read_jsonl(str(tmp_path))
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {"step": 1, "loss": 0.25, "lr": 1e-4},
        {"step": 2, "loss": None, "grad_norm": None},  # JSON has no NaN/inf: written as null
    ]
    assert all(before <= line["time"] <= time.time() for line in lines)


def test_reserved_jsonl_keys_raise(tmp_path):
    with MetricWriter(str(tmp_path)) as writer, pytest.raises(ValueError, match="clash"):
        writer.write_scalars(1, {"step": 1.0})


def test_everything_is_readable_before_close(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(4, {"loss": 0.5})
    assert [e.value for e in _accumulator(str(tmp_path)).Scalars("loss")] == [0.5]
    assert _read_jsonl(str(tmp_path))[0]["loss"] == 0.5
    writer.close()


def test_reopen_appends(tmp_path):
    logdir = str(tmp_path)
    with MetricWriter(logdir) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_scalars(2, {"loss": 0.5})
    with MetricWriter(logdir) as writer:  # a resumed run, possibly within the same second
        writer.write_scalars(3, {"loss": 0.25})
    files = _event_files(logdir)
    assert len(files) == 2
    assert all(f".{socket.gethostname()}." in os.path.basename(f) for f in files)
    assert [(e.step, e.value) for e in _accumulator(logdir).Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert [line["step"] for line in _read_jsonl(logdir)] == [1, 2, 3]


def test_disabled_writer_creates_nothing(tmp_path):
    logdir = tmp_path / "not_here"
    with MetricWriter(str(logdir), enabled=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, {"image": np.zeros((2, 2, 3))})
        writer.flush()
    assert not logdir.exists()


def test_closed_writer_raises_and_close_is_idempotent(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.close()
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write_scalars(1, {"loss": 1.0})


# --- Progress --------------------------------------------------------------------------------------------------------


def test_progress_shows_loss_and_lr(capsys):
    with Progress(total_steps=100, initial_step=40, enabled=True) as progress:
        progress.update(50, {"loss": 0.123456, "lr": 3e-5, "other": 1.0})
        progress.update(60, {"loss": np.float32(0.5)})
        assert progress._bar.n == 60
    final = capsys.readouterr().err.split("\r")[-1]  # the line close() leaves
    assert "60/100" in final and "loss=0.5000" in final and "lr=3.00e-05" in final
    assert "other" not in final


def test_disabled_progress_is_silent(capsys):
    progress = Progress(total_steps=10, initial_step=0, enabled=False)
    progress.update(5, {"loss": 1.0})
    progress.close()
    assert capsys.readouterr().err == ""
