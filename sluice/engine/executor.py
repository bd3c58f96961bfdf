"""Where a step's model work runs, behind one method.

`ModelRunner` is the in-process executor: it runs the step on this thread. The scheduler only
ever hands an executor a `StepInput` (plain data) and reads back a `StepOutput`, so an executor
that runs workers in other processes (torch.distributed, one rank per device) can stand in for it
without touching the scheduler.
"""

from __future__ import annotations

from typing import Protocol

from sluice.engine.step import StepInput, StepOutput


class Executor(Protocol):
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step's forward and sample its sample rows."""
        ...
