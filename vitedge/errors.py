"""One exception type for every user-facing failure.

Its message is exactly the line the CLI prints: what is wrong and what to do.
"""


class VitedgeError(Exception):
    """A failure caused by the user's input or environment, not a bug in vitedge."""

    exit_code = 2


class ValidationFailed(VitedgeError):
    """The static artifact disagrees with the reference beyond the thresholds."""

    exit_code = 3


class BudgetMissed(VitedgeError):
    """No model or variant meets the latency budget."""

    exit_code = 4
