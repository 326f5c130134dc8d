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
    """Measured latency misses the budget: ``profile`` (report written), ``tune`` or ``select`` (nothing meets it)."""

    exit_code = 4


class BuildFailed(VitedgeError):
    """TensorRT ran and could not build the engine (parser or builder error)."""

    exit_code = 5


class BackendMissing(VitedgeError):
    """The backend (TensorRT) is not installed here; ``trtexec.sh`` is still written."""

    exit_code = 6


class ArtifactBusy(VitedgeError):
    """Another vitedge process is writing the same output folder (its lock is held)."""

    exit_code = 7
