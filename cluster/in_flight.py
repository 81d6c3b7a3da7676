"""The steps the workers hold, and what each pipeline stage did with its time.

With pp stages the engine keeps up to pp steps in flight: while stage s works on batch k,
stage s + 1 works on batch k - 1, and the driver schedules, sends and takes back batches
around them. Steps come back in the order they were sent (each stage runs its calls in
order), so the oldest is always the next to finish.

Busy and bubble time, per stage. Each step's output carries how long every stage worked on
it (`StepOutput.stage_busy_s`, measured on the workers: durations, so no clocks need to
agree). The engine is *active* while it has work: requests to run or steps in flight. A
stage's bubble is the active time it did not work:

    bubble_s(stage) = active_s - busy_s(stage)

which counts the pipeline filling and draining, a stage waiting on a slower neighbour, and
the driver's own time between steps when it is on the critical path.
"""

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from actors.step_io import StepOutput
from cluster.metrics import EngineMetrics
from cluster.scheduler import ScheduledSeq


@dataclass
class InFlightStep:
    batch: list[ScheduledSeq]
    output: asyncio.Future[StepOutput]


@dataclass
class StageTimes:
    """Running totals since the engine started, per stage (stage 0 first)."""

    active_s: float = 0.0
    busy_s: list[float] = field(default_factory=list)

    @property
    def bubble_s(self) -> list[float]:
        return [max(0.0, self.active_s - busy) for busy in self.busy_s]

    def copy(self) -> "StageTimes":
        return StageTimes(self.active_s, list(self.busy_s))


class InFlight:
    """Up to `depth` steps on the workers, oldest first, and the stage times they add up to."""

    def __init__(self, depth: int, metrics: EngineMetrics):
        self.depth = depth
        self.steps: deque[InFlightStep] = deque()
        self.times = StageTimes(busy_s=[0.0] * depth)
        self.metrics = metrics
        self._active_since: float | None = None
        self._exported_bubble = [0.0] * depth

    def __len__(self) -> int:
        return len(self.steps)

    def has_room(self) -> bool:
        return len(self.steps) < self.depth

    def add(self, batch: list[ScheduledSeq], output: asyncio.Future[StepOutput]) -> None:
        self.steps.append(InFlightStep(batch, output))

    async def pop_oldest(self) -> tuple[list[ScheduledSeq], StepOutput]:
        """Wait for the oldest step; its batch and output. Raises what the step raised."""
        step = self.steps[0]
        try:
            result = await step.output
        finally:
            if self.steps and self.steps[0] is step:
                self.steps.popleft()
        self._account(result.stage_busy_s)
        return step.batch, result

    def discard(self) -> None:
        """Forget every step in flight (their workers are gone, or going)."""
        for step in self.steps:
            if step.output.done():
                if not step.output.cancelled():
                    step.output.exception()  # retrieved: no "never retrieved" warning
            else:
                step.output.cancel()
        self.steps.clear()

    def active(self, active: bool) -> None:
        """The engine has work (requests or steps in flight) from now on, or has none."""
        now = time.monotonic()
        if active and self._active_since is None:
            self._active_since = now
        elif not active and self._active_since is not None:
            self.times.active_s += now - self._active_since
            self._active_since = None

    def _account(self, stage_busy_s: tuple[float, ...]) -> None:
        if self._active_since is not None:  # close the active time so far
            now = time.monotonic()
            self.times.active_s += now - self._active_since
            self._active_since = now
        for stage, busy in enumerate(stage_busy_s):
            self.times.busy_s[stage] += busy
        for stage, bubble in enumerate(self.times.bubble_s):
            # a step's busy time lands when it returns, its active time all along: export
            # the bubble total only as it grows, so the counter never goes back
            if bubble > self._exported_bubble[stage]:
                self.metrics.stage_bubble(stage, bubble - self._exported_bubble[stage])
                self._exported_bubble[stage] = bubble
        for stage, busy in enumerate(stage_busy_s):
            self.metrics.stage_busy(stage, busy)
