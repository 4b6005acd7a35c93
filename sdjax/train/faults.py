"""Fault injection for the preemption tests: SDJAX_FAULT="<point>:<step>" kills this process with
SIGKILL when the run reaches `point` at `step` — "step" right after the step's computation is
dispatched (mid-step; earlier checkpoint saves are let finish first, so the test knows where the
run resumes), "save" right after that step's checkpoint save has started (mid-save).
Unset (the normal case), nothing happens."""

from __future__ import annotations

import os
import signal
from typing import Callable

POINTS = ("step", "save")


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
