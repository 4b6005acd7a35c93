import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/builders.py

# builders imports torch; the fixtures import it when used, so torch-free runs (CI's Python 3.12 run with the
# current jax and libtpu) collect the suite and skip only what needs the PyTorch reference.
NO_TORCH = "the PyTorch reference is not installed (torch-free run)"

from sdjax import backends  # noqa: E402

backends.prepare()  # the tests' own JAX is set up as the tools' is (CPU kernels; off libtpu without TPUs)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """sample.py and train.py keep compiled programs in $SDJAX_CACHE_DIR: one folder for this test session
    (shared by xdist's workers), so the many runs of the same tiny programs compile once, and no test reads
    or fills the user's ~/.cache. The tests' own processes use it too: their many jits of the same tiny
    networks compile once (test_pipeline + test_parity: 303 s -> 228 s, one worker). Jit's in-memory
    caches, which tests count, are unchanged by it."""
    from sdjax.pipeline import enable_compilation_cache

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-cache"
    previous = os.environ.get("SDJAX_CACHE_DIR")
    os.environ["SDJAX_CACHE_DIR"] = str(folder)
    enable_compilation_cache(str(folder))
    yield str(folder)
    if previous is None:
        os.environ.pop("SDJAX_CACHE_DIR", None)
    else:
        os.environ["SDJAX_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny SD1- and SD2-style diffusers folders with their torch reference components."""
    pytest.importorskip("torch", reason=NO_TORCH)
    import builders

    root = str(tmp_path_factory.mktemp("checkpoints"))
    return {flavour: (os.path.join(root, flavour), builders.save_pipeline(root, flavour)) for flavour in ("sd1", "sd2")}


@pytest.fixture(scope="session")
def sdxl_checkpoints(tmp_path_factory):
    """Tiny SDXL base and refiner diffusers folders with their torch reference components."""
    pytest.importorskip("torch", reason=NO_TORCH)
    import builders

    root = str(tmp_path_factory.mktemp("sdxl"))
    return {kind: (os.path.join(root, kind), builders.save_sdxl_pipeline(root, kind)) for kind in ("base", "refiner")}


@pytest.fixture(scope="session")
def inpaint_checkpoint(tmp_path_factory):
    """A tiny SD1-style inpainting checkpoint (9-channel UNet)."""
    pytest.importorskip("torch", reason=NO_TORCH)
    import builders

    root = str(tmp_path_factory.mktemp("inpaint"))
    builders.save_pipeline(root, "sd1", inpainting=True)
    return os.path.join(root, "sd1")


@pytest.fixture(scope="module")
def gcs():
    """A local GCS emulator for one test file, with this process (and the subprocesses it starts) pointed at
    it; fsspec's cached filesystems are dropped on both sides, so no client keeps another emulator's address."""
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:  # not imported here: it reads emulator.env's settings at import
        pytest.skip("gcsfs is not installed")
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed")
    import fsspec

    from gcs_emulator import Emulator
    from sdjax import storage

    emulator = Emulator()
    previous = {key: os.environ.get(key) for key in emulator.env}
    os.environ.update(emulator.env)
    fsspec.get_filesystem_class("gs").clear_instance_cache()
    storage._filesystem.cache_clear()
    yield emulator
    emulator.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._filesystem.cache_clear()
