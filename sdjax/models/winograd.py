"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2015), for float32 on one CPU device.

Each 2x2 block of outputs is computed from a 4x4 tile of the input: the tile and the 3x3 kernel are each
transformed into 16 values (sums and differences; the kernel's with halves), the 16 pairs are multiplied
as 16 matmuls over channels, and the products are transformed back. That is 16 multiplications per 2x2
outputs and input channel instead of 36: 2.25x fewer FLOPs. The transforms are exact up to float32
rounding (relative error ~1e-6, like the direct convolution's).

Why our own code, not a library kernel: XLA:CPU runs every convolution directly (as does torch's oneDNN
for float32), and both stop near the same fraction of the CPU's matmul peak. On a 2-core AVX-512 "AMD EPYC"
(2026-12-05, BENCHMARKS.md), one forward of SD's 3x3 convolutions took 1.3-2.2x less time this way
(batch 2: 64x64, 320 channels 86 -> 52 ms; 32x32, 640 channels 79 -> 46 ms; 16x16, 1280 channels
100 -> 74 ms), and their gradients 1.1-3.3x less. The 16 matmuls are written out one by one: as one
batched matmul XLA:CPU ran them ~1.5x slower. With few channels the transforms, which move 4x the input
and output through memory, cost more than the multiplications save (the VAE's 128-channel levels: 0.84-0.88x),
so `layers` takes this path from 256 channels up. The kernel's transform depends on parameters only:
XLA:CPU's default (concurrency-first) scheduler would make every layer's at the start of the program, all
alive at once; sdjax.backends chooses the memory-minimising one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Found by name in compiled programs: XLA's cost analysis counts this path's FLOPs, fewer than the
# convolution's it computes (sdjax.flops.counts_short).
WINOGRAD_SCOPE = "cpu_winograd_convolution"


def _input_rows(d: list[jax.Array]) -> list[jax.Array]:
    """B^T d for the four rows (or columns) d0..d3 of input tiles."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _kernel_rows(g: list[jax.Array]) -> list[jax.Array]:
    """G g for the three rows (or columns) g0..g2 of a 3x3 kernel."""
    return [g[0], 0.5 * (g[0] + g[1] + g[2]), 0.5 * (g[0] - g[1] + g[2]), g[2]]


def _output_rows(m: list[jax.Array]) -> list[jax.Array]:
    """A^T m for the four rows (or columns) m0..m3 of transformed products."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _conv3x3(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    (batch, height, width, cin), cout = x.shape, kernel.shape[-1]
    tiles_h, tiles_w = -(-height // 2), -(-width // 2)
    # Padding 1 on every side, plus a row / column of zeros where the side is odd, so the tiles
    # (stride 2, size 4) cover it; the extra outputs are cropped below.
    padded = jnp.pad(x, ((0, 0), (1, 1 + 2 * tiles_h - height), (1, 1 + 2 * tiles_w - width), (0, 0)))
    # Tile element (a, b) of every tile at once: a strided slice of the padded input.
    rows = _input_rows([padded[:, a:a + 2 * tiles_h:2] for a in range(4)])
    tiles = [v for row in rows for v in _input_rows([row[:, :, b:b + 2 * tiles_w:2] for b in range(4)])]
    kernel_rows = _kernel_rows([kernel[i] for i in range(3)])
    kernels = [u for row in kernel_rows for u in _kernel_rows([row[j] for j in range(3)])]
    products = [jnp.dot(v.reshape(-1, cin), u, precision=precision).reshape(batch, tiles_h, tiles_w, cout)
                for v, u in zip(tiles, kernels)]
    # A^T along the tile rows (p) for each column (q), then along the columns: blocks[i][j] holds output
    # (i, j) of every 2x2 block.
    by_column = [_output_rows([products[4 * p + q] for p in range(4)]) for q in range(4)]
    blocks = [_output_rows([by_column[q][i] for q in range(4)]) for i in range(2)]
    out = jnp.stack([jnp.stack(block, axis=3) for block in blocks], axis=2)  # (B, th, 2, tw, 2, C)
    return out.reshape(batch, 2 * tiles_h, 2 * tiles_w, cout)[:, :height, :width]


def conv3x3(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """x (B, H, W, Cin) convolved with kernel (3, 3, Cin, Cout), stride 1, padding 1 on every side ->
    (B, H, W, Cout); the same as lax.conv_general_dilated with NHWC / HWIO operands, to float rounding.
    The transformed tiles (4x the input) are recomputed in the backward pass, not stored."""
    with jax.named_scope(WINOGRAD_SCOPE):
        return jax.checkpoint(_conv3x3, static_argnums=2)(x, kernel, precision)
