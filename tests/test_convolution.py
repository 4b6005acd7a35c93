"""The CPU im2col path of sdjax's convolutions (few output pixels, large kernels) against lax's convolution."""

import jax
import numpy as np
import pytest

from sdjax.models import layers
from sdjax.models.layers import single_cpu_device


@pytest.mark.skipif(not single_cpu_device(), reason="the path of one CPU device")
@pytest.mark.parametrize("shape, kernel, padding", [((2, 4, 4, 24), (3, 3, 24, 16), ((1, 1), (1, 1))),
                                                    ((1, 5, 3, 8), (3, 3, 8, 8), ((0, 1), (2, 0)))])
def test_im2col_convolution_matches_lax_and_its_gradients(monkeypatch, shape, kernel, padding):
    monkeypatch.setattr(layers, "CPU_IM2COL_MIN_WEIGHTS", 1)
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), kernel)
    args = ((1, 1), padding)
    dims = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))
    lowered = jax.jit(lambda x, w: layers._convolution(x, w, *args, dimension_numbers=dims)).lower(x, w)
    assert "convolution" not in lowered.as_text()  # the im2col path was taken

    def loss(fn):
        return lambda x, w: (fn(x, w, *args, dimension_numbers=dims) ** 2).sum()

    got = layers._convolution(x, w, *args, dimension_numbers=dims)
    want = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dims)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4)
    for got, want in zip(jax.grad(loss(layers._convolution), (0, 1))(x, w),
                         jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)


def test_many_pixels_or_small_kernels_keep_the_convolution():
    x = jax.numpy.ones((2, 16, 16, 8))  # 512 output pixels
    w = jax.numpy.ones((3, 3, 8, 8))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    text = jax.jit(lambda x, w: layers._convolution(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)).lower(x, w).as_text()
    assert "convolution" in text
