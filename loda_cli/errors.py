"""Typed errors raised by the loda library.

The library raises these and never prints; the CLI turns them into a one-line message and an exit
code. This module imports nothing from the package so every other module can use it.
"""

from __future__ import annotations


class LodaError(Exception):
    """Base class of every error loda raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(LodaError):
    """The invocation itself is wrong: bad option values, conflicting flags, unknown names."""

    exit_code = 2


class ModelNotFoundError(UsageError):
    """A ``--model`` value names no file, no checkpoint in $LODA_HOME and no manifest entry."""


class BackboneUnavailableError(LodaError):
    """Pretrained backbone weights are neither in the local cache nor downloadable."""


class CheckpointError(LodaError):
    """A checkpoint file is missing, truncated, tampered with, or inconsistent with its metadata."""


class StateDictMismatchError(CheckpointError):
    """Loading a state dict would leave the model wrong: missing or wrong-shape tensors."""


class ImageError(LodaError):
    """One image could not be decoded. Scoring turns it into an error row, never a crash.

    ``transient`` marks failures of the moment (a timeout, memory running out) rather than of the
    file: the cache does not remember them, so the next run tries the file again.
    """

    def __init__(self, message: str = "", *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class NoImagesError(LodaError):
    """The given paths hold no image file at all."""


class DatasetError(LodaError):
    """A dataset folder or label file is missing or malformed."""


class MetricError(LodaError):
    """Metric inputs are unusable: mismatched lengths, NaNs, too few samples."""


class MetricWarning(UserWarning):
    """A metric was computed, but on a fallback: a constant input or a failed logistic fit.
    (Defined here, beside the errors, so the CLI can recognise it without importing scipy.)"""


class UnsafePathError(LodaError):
    """A path read from a CSV, journal or argument escapes the roots it belongs to."""


class JournalError(LodaError):
    """A move journal is unreadable, or undoing it would be ambiguous or unsafe."""


class NothingToUndoError(JournalError):
    """Every journal that could be meant is already undone. Not a failure: the CLI says so and
    exits 0."""

    exit_code = 0

    def __init__(self, journal: str, undone_at: str):
        super().__init__(f"nothing left to undo; the last journal, {journal}, was undone at {undone_at}")
        self.journal = journal
        self.undone_at = undone_at


class OutputError(LodaError):
    """An output file could not be written (disk full, permissions)."""


class DownloadError(LodaError):
    """A dataset could not be fetched, verified or unpacked; what is on disk stays usable."""
