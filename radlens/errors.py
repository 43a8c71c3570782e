"""The exceptions radlens raises: one per failure a stage boundary must tell apart."""

from __future__ import annotations


class RadlensError(Exception):
    """Base class of every error radlens raises on purpose."""


class ConfigError(RadlensError):
    """The configuration is invalid; the message names the field and the reason."""


class SpoolError(RadlensError):
    """An instance could not be made durable (disk full, I/O error)."""


class InvalidDatasetError(RadlensError):
    """A received dataset cannot be parsed or lacks the UIDs needed to file it."""


class UnsupportedImageError(RadlensError):
    """An object has no usable pixels (no pixel data, unknown photometric, undecodable)."""


class DestinationError(RadlensError):
    """A destination could not be reached or refused the association."""


class ComputeUnavailableError(RadlensError):
    """The model stage could not run at all (its Ray actor died, the Ray cluster is gone): the
    job is retried, rather than its images reported as failed analyses."""


class JobAttemptError(RadlensError):
    """One attempt of a job failed in its worker process; the message is the whole reason the
    job records (the exception's type is in it already, or it is a worker's death)."""


class WorkerLostError(JobAttemptError):
    """The worker process running a job was killed (past a limit) or died."""
