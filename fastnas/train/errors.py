"""Errors a training reports to its user: each says what went wrong and what to do."""


class TrainError(Exception):
    """A training cannot start or go on; the message says why and what to do."""
