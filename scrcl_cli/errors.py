"""The one exception type that user errors raise.

The CLI turns a :class:`ScrclError` into a single ``error: <problem> <fix>`` line on stderr
and exit code 1. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ScrclError(ValueError):
    """A user error: what went wrong and what to do about it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.problem}."
        if self.fix:
            text += f" {self.fix}."
        return " ".join(text.split())  # always one line
