import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/builders.py

# builders imports torch; the fixtures import it when used, so torch-free runs (e.g. the TPU compile
# tests in an environment with libtpu and without torch) can collect the suite.


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny SD1- and SD2-style diffusers folders with their torch reference components."""
    import builders

    root = str(tmp_path_factory.mktemp("checkpoints"))
    return {flavour: (os.path.join(root, flavour), builders.save_pipeline(root, flavour)) for flavour in ("sd1", "sd2")}


@pytest.fixture(scope="session")
def inpaint_checkpoint(tmp_path_factory):
    """A tiny SD1-style inpainting checkpoint (9-channel UNet)."""
    import builders

    root = str(tmp_path_factory.mktemp("inpaint"))
    builders.save_pipeline(root, "sd1", inpainting=True)
    return os.path.join(root, "sd1")
