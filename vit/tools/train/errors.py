"""The failure of ``fastvit train`` that is reported as one line (exit status 1)."""


class TrainError(RuntimeError):
    """A failure with a message meant for the user (no traceback needed)."""
