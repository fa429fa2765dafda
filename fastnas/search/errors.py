"""Errors a search reports to its user: each says what went wrong and what to do."""


class SearchError(Exception):
    """A search cannot start or go on; the message says why and what to do."""


class CheckpointError(SearchError):
    """A checkpoint is missing, unreadable, or does not fit the requested search."""


class NonFiniteLossError(SearchError):
    """The loss became inf or NaN; the last good checkpoint is left untouched."""


class OutOfMemoryError(SearchError):
    """The device ran out of memory during a step."""
