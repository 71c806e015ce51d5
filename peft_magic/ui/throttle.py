"""A tiny redraw throttle: at most N redraws a second, with a way to force one.

Every widget update is a message to the browser; a tiny model can finish dozens of steps a second, and
redrawing on each would cost more than the training. The panel asks `Throttle.ready()` on every event and
only redraws when it says yes; evaluations and the end of the run force a redraw so nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Rate limiter for redraws.

    Args:
        max_per_second: Most redraws a second; ``0`` or less means no limit.
        clock: Monotonic clock in seconds (a fake one in tests).
    """

    def __init__(self, max_per_second: float = 4.0, clock: Callable[[], float] = time.monotonic):
        self.interval = 1.0 / max_per_second if max_per_second > 0 else 0.0
        self.clock = clock
        self._last: float | None = None

    def ready(self, force: bool = False) -> bool:
        """Whether to redraw now; a yes is recorded as a redraw.

        Args:
            force: Redraw regardless of the rate (after an evaluation, at the end).
        """
        now = self.clock()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False
