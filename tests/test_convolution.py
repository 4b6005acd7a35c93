"""The CPU paths of sdjax's convolutions against lax's convolution: im2col (few output pixels, large kernels) and
Winograd's F(2x2, 3x3) (float32 3x3 convolutions with many channels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.models import layers, winograd
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


def _lax_conv3x3(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")


@pytest.mark.parametrize("shape, cout", [((2, 8, 8, 16), 24), ((1, 7, 5, 8), 8), ((3, 1, 1, 4), 4), ((1, 2, 9, 5), 3)])
def test_winograd_matches_lax_and_its_gradients(shape, cout):
    # Even and odd sides (the odd ones padded to whole tiles and cropped), and a single pixel.
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], cout))
    got, want = winograd.conv3x3(x, w), _lax_conv3x3(x, w)
    assert got.shape == want.shape
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)
    loss = lambda fn: lambda x, w: (fn(x, w) * want).sum()
    for got, want_grad in zip(jax.grad(loss(winograd.conv3x3), (0, 1))(x, w), jax.grad(loss(_lax_conv3x3), (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_grad), rtol=0,
                                   atol=1e-5 * float(jnp.abs(want_grad).max()))


@pytest.mark.skipif(not single_cpu_device(), reason="the path of one CPU device")
def test_wide_float32_3x3_convolutions_take_winograd_and_are_counted_as_convolutions(monkeypatch):
    from sdjax.flops import compiled_flops, counts_short, traced_flops

    monkeypatch.setattr(layers, "CPU_WINOGRAD_MIN_CHANNELS", 16)
    x, w = jnp.ones((2, 16, 16, 16)), jnp.ones((3, 3, 16, 16))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    conv = lambda stride=(1, 1), padding=((1, 1), (1, 1)): jax.jit(
        lambda x, w: layers._convolution(x, w, stride, padding, dimension_numbers=dims))
    assert "convolution" not in conv().lower(x, w).as_text()  # Winograd's matmuls
    compiled = conv().lower(x, w).compile()
    assert counts_short(compiled)
    # The direct convolution's FLOPs as XLA counts them, kernel taps on the zero padding left out (46 of a
    # side's 16 x 3), x 2 x 16 x 16 per tap and batch element; Winograd's own count is near 4/9 of it.
    direct = 2 * 46 * 46 * 2 * 16 * 16
    assert traced_flops(conv(), x, w) == pytest.approx(direct, rel=0.01)
    assert compiled_flops(compiled) < 0.6 * direct
    # Kept as convolutions: other strides or paddings, too few channels, bfloat16.
    assert "convolution" in conv((2, 2)).lower(x, w).as_text()
    assert "convolution" in conv(padding=((0, 0), (0, 0))).lower(x, w).as_text()
    assert "convolution" in conv().lower(x[..., :8], w[:, :, :8]).as_text()
    assert "convolution" in conv().lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
    assert not counts_short(jax.jit(_lax_conv3x3).lower(x, w).compile())
