"""Small building blocks shared by the CLIP, VAE and UNet modules.

Every parameter carries logical axis names (see `sdjax.models.AXES`), so a later
rules table can map them onto a device mesh without touching model code.
Parameter trees stay plain pytrees: the names live only in the boxed values
returned by `init`, which `flax.linen.unbox` strips.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.winograd import conv3x3 as winograd_conv3x3

Dtype = Any

# Activation names as they appear in diffusers/transformers config.json files.
# Exact (erf) gelu everywhere: Flax's default is the tanh approximation, which
# does not match the PyTorch reference.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
}


def activation(name: str, where: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by its config name; `where` names the config key for errors."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {name!r} (known: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


def _partitioned(init: Callable, axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    """A Dense layer whose kernel is named `axes` = (in, out) and bias (out,)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=_partitioned(nn.initializers.lecun_normal(), axes),
        bias_init=_partitioned(nn.initializers.zeros_init(), axes[1:]),
    )


# On one CPU device, a convolution whose kernel is large (>= 2^23 weights: SD's 1280- and 2560-channel
# levels) but whose output has few pixels (<= 256: the 8x8 and 4x4 levels at batch 1-2) runs 1.2-3.4x
# faster as one matmul over the kernel's shifted copies of the input (im2col): XLA:CPU's convolution
# reached 33-75 GFLOP/s there against 110-175 for the matmul. With more pixels or smaller kernels the
# convolution is as fast or faster (the small model's 64-channel training batches: im2col 1.4-4.6x
# slower), so it stays.
CPU_IM2COL_MAX_PIXELS = 256
CPU_IM2COL_MIN_WEIGHTS = 2**23
# Elsewhere on one CPU device, float32 3x3 convolutions (stride 1, padding 1) with at least this many input
# and output channels run by Winograd's F(2x2, 3x3) (sdjax.models.winograd: 1.3-2.2x faster at SD's
# 320-1280 channels); with fewer the transforms cost more than they save (128 channels: 0.84-0.88x).
CPU_WINOGRAD_MIN_CHANNELS = 256

# Part of jax's trace context (unlike a plain context variable), so a function traced inside
# counting_flops and the same function traced outside never share a cached trace, in either direction.
_COUNTING_FLOPS = jax.make_user_context(default_value=False)


@contextlib.contextmanager
def counting_flops() -> Iterator[None]:
    """Kernels traced inside this block take their plain one-op forms, whatever the platform or the model's
    choice: attention as einsums, convolutions as XLA convolutions. The same network, in a program whose
    FLOPs XLA's cost analysis counts in full (it counts a loop body such as the CPU's blocked attention
    once, a custom call such as cuDNN's not at all, and Winograd's fewer multiplications as they are).
    For programs that are counted, not run."""
    with _COUNTING_FLOPS(True):
        yield


def counting() -> bool:
    """Whether the program being traced is one only counted (inside `counting_flops`)."""
    return _COUNTING_FLOPS.value


def single_cpu_device() -> bool:
    """Whether programs run on one CPU device: where sdjax's CPU-only kernels (im2col here, blocked
    attention) apply. With several devices the one-op forms stay, so a sharded batch is not gathered
    and plans compiled on a CPU host keep the programs that GPU/TPU would run."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        # Traced under a mesh (jax.set_mesh), the program runs on that mesh's devices, which need not be
        # this host's: plan.py --target compiles for TPU chips while JAX's own backend is the CPU.
        platform = getattr(getattr(mesh, "abstract_device", None), "platform", None)
        if mesh.size > 1 or platform not in (None, "cpu"):
            return False
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _convolution(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None):
    """lax.conv_general_dilated with NHWC / HWIO operands, as nn.Conv calls it; on one CPU device im2col or
    Winograd where faster."""
    (batch, height, width, _), (kh, kw, cin, cout) = lhs.shape, rhs.shape
    explicit = not isinstance(padding, str)
    out_h = height + sum(padding[0]) - kh + 1 if explicit else height
    out_w = width + sum(padding[1]) - kw + 1 if explicit else width
    plain = (explicit and feature_group_count == 1 and tuple(window_strides) == (1, 1)
             and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())))
    if plain and not counting() and single_cpu_device():
        if batch * out_h * out_w <= CPU_IM2COL_MAX_PIXELS and rhs.size >= CPU_IM2COL_MIN_WEIGHTS:
            padded = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
            shifted = [padded[:, i:i + out_h, j:j + out_w, :] for i in range(kh) for j in range(kw)]
            columns = jnp.concatenate(shifted, axis=-1).reshape(batch * out_h * out_w, kh * kw * cin)
            out = jnp.dot(columns, rhs.reshape(kh * kw * cin, cout), precision=precision)
            return out.reshape(batch, out_h, out_w, cout)
        if ((kh, kw) == (3, 3) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
                and lhs.dtype == rhs.dtype == jnp.float32 and min(cin, cout) >= CPU_WINOGRAD_MIN_CHANNELS):
            # float32 only: in bfloat16 the transforms' sums would add rounding of their own.
            return winograd_conv3x3(lhs, rhs, precision)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision)


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | str | Sequence = "SAME",
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
    """An NHWC convolution; kernel axes (kh, kw, in, out) are named for sharding by channel."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding,
        dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=_convolution,
        kernel_init=_partitioned(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("conv_out",)),
    )


def group_norm(groups: int, eps: float, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.GroupNorm:
    """GroupNorm over channels (statistics in float32 whatever the compute dtype)."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
    )


def layer_norm(eps: float, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis (statistics in float32)."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)),
    )


def embed(num: int, features: int, axes: tuple[str | None, str | None], *, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Embed:
    """An embedding table named `axes` = (rows, features)."""
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype, name=name,
                    embedding_init=_partitioned(nn.initializers.normal(0.02), axes))


def resize_nearest(x_nhwc: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize with PyTorch's index rule (src = floor(dst * in / out))."""
    h, w = x_nhwc.shape[1:3]
    rows = (jnp.arange(height) * h) // height
    cols = (jnp.arange(width) * w) // width
    return x_nhwc[:, rows][:, :, cols]
