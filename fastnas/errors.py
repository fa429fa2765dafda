"""Errors a run reports to its user: each says what went wrong and what to do.

One module at the bottom of the package, so that every layer (spaces, the run
layer, search, train, the tools) raises the same classes; the command line
reports any ``RunError`` as one line and exits with status 1. The errors both
kinds of run raise are a ``SearchError`` and a ``TrainError`` alike, so that
either is caught where a caller expects its kind of run's errors.
"""


class RunError(Exception):
    """A search, training or tool cannot start or go on; the message says why and what to do."""


class SearchError(RunError):
    """A search cannot start or go on."""


class TrainError(RunError):
    """A training cannot start or go on."""


class CheckpointError(SearchError, TrainError):
    """A checkpoint is missing, unreadable, or does not fit the requested run."""


class NonFiniteLossError(SearchError, TrainError):
    """The loss or a parameter became inf or NaN; the last good checkpoint is left untouched."""


class OutOfMemoryError(SearchError, TrainError):
    """The device ran out of memory during a step."""
