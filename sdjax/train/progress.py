"""A tqdm progress bar for the training loop: steps done, ETA, and the latest loss and learning rate."""

from __future__ import annotations

from types import TracebackType

from tqdm import tqdm

# Metrics shown in the postfix, with their format.
POSTFIX_FORMATS = {"loss": "{:.4f}", "lr": "{:.2e}"}


class Progress:
    """Progress over `total_steps`, starting at `initial_step` (a resumed run); no output when not `enabled`.

    Call `update` at log intervals with host values: float() on a device array waits for the device.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True) -> None:
        # tqdm's rate (and so its ETA) counts only steps done since `initial`, not the resumed ones.
        self._bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled, unit="step",
                         dynamic_ncols=True)
        self._step = initial_step
        self._postfix: dict[str, str] = {}

    def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
        """Moves the bar to `step` (the number of steps done) and shows loss/lr from `metrics` if present."""
        if metrics:
            # Merged, so a metric logged less often than the others keeps showing its last value.
            shown = {k: fmt.format(float(metrics[k])) for k, fmt in POSTFIX_FORMATS.items() if k in metrics}
            self._postfix.update(shown)
            self._bar.set_postfix(self._postfix, refresh=False)  # update() below redraws, rate-limited by tqdm
        self._bar.update(int(step) - self._step)
        self._step = int(step)

    def close(self) -> None:
        """Closes the bar (leaves the final line on screen)."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
