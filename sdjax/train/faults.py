"""Fault injection for the failure tests: SDJAX_FAULT="<point>:<step>" acts when the run reaches `point`
at `step`:

    step  SIGKILLs this process right after the step's computation is dispatched (mid-step; earlier
          checkpoint saves are let finish first, so the test knows where the run resumes)
    save  SIGKILLs it right after that step's checkpoint save has started (mid-save)
    export  SIGKILLs it in the export to a bucket that follows that (last) step, once the upload has begun
          (mid-export)
    nan   after that step, puts a NaN into the trained parameters (the first element of their first
          leaf), as a diverging update would; the run must then refuse to checkpoint or export them

Unset (the normal case), nothing happens."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

import jax
import jax.numpy as jnp

POINTS = ("step", "save", "export", "nan")


def _target() -> tuple[str, int] | None:
    value = os.environ.get("SDJAX_FAULT", "")
    if not value:
        return None
    point, _, step = value.partition(":")
    if point not in POINTS or not step.isdigit():
        raise ValueError(f"SDJAX_FAULT={value!r}: expected <point>:<step> with point in {', '.join(POINTS)}")
    return point, int(step)


def maybe_kill(point: str, step: int, before: Callable[[], None] | None = None) -> None:
    """SIGKILLs this process if SDJAX_FAULT names this point and step (after calling `before`)."""
    if _target() == (point, step):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_put_nan(step: int, params: Any) -> Any:
    """`params` with a NaN in the first element of their first leaf if SDJAX_FAULT is "nan:<step>",
    else `params` itself (the leaf keeps its sharding, so the compiled step still accepts it)."""
    if _target() != ("nan", step):
        return params
    leaves, treedef = jax.tree.flatten(params)
    first = leaves[0]
    put = jax.jit(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), out_shardings=first.sharding)
    return jax.tree.unflatten(treedef, [put(first), *leaves[1:]])
