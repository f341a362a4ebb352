"""The size of the fitness batch over a run: fixed, or growing as improvements stop carrying
over to new images.

Early in a run most of what the best solution gains on a fitness batch is a real gain,
and it carries over to the next batch; late, the true gains shrink while the batch's
noise does not, and a winner on a small batch is ever more often a winner by chance. The
carry-over is measured at every batch draw, on the new batch: the best solution now
against the best solution when the previous batch was drawn, both scored on the same new
images (a paired comparison, so the new batch's difficulty cancels). When, over the last
`window` batches, the fresh gain falls below `below` times the gain seen on the batches
themselves, the batch doubles (up to `cap`), at the price of slower evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import HwqError


@dataclass
class BatchSchedule:
    """`size` images per fitness batch; with `window` > 0 it doubles (up to `cap`) at a batch
    draw when the gains of the last `window` batches carried over less than `below`."""

    size: int
    cap: int
    window: int = 0
    below: float = 0.0
    gains: list[tuple[float, float]] = field(default_factory=list)  # per image: (its batch, the next)

    def __post_init__(self) -> None:
        if self.window < 0 or not 0 <= self.below <= 1:
            raise HwqError("--grow-window must be positive and --grow-below in [0, 1]")
        if self.cap < self.size:
            raise HwqError(f"--max-fitness-images {self.cap} is below --fitness-images {self.size}")

    @property
    def grows(self) -> bool:
        return self.window > 0 and self.size < self.cap

    def observe(self, batch_gain: float, fresh_gain: float) -> None:
        """Record a batch's gain of the best fitness on it and the same change's gain on the
        next batch, both per image (the two batches differ in size when the batch grew)."""
        if self.window:
            self.gains = [*self.gains, (float(batch_gain), float(fresh_gain))][-self.window :]

    def carry_over(self) -> float | None:
        """The share of the window's batch gains that held on fresh images, once it is full
        (0 when there was no gain at all)."""
        if not self.window or len(self.gains) < self.window:
            return None
        batch = sum(g for g, _ in self.gains)
        return sum(f for _, f in self.gains) / batch if batch > 0 else 0.0

    def grow(self) -> bool:
        """At a batch draw: double the batch if gains stopped carrying over; True if it grew.
        The window starts afresh, so the larger batch is judged on its own gains."""
        carry = self.carry_over()
        if carry is None or carry >= self.below or self.size >= self.cap:
            return False
        self.size = min(2 * self.size, self.cap)
        self.gains = []
        return True

    def state_dict(self) -> dict:
        return {"size": self.size, "gains": [list(g) for g in self.gains]}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.gains = [(float(b), float(f)) for b, f in state["gains"]]
