"""Named exceptions for user-facing failures.

Every error a user can cause (bad file, bad config, mismatched checkpoint) is a
:class:`KernelscaleError`; the command line prints its message as one line and exits
with :attr:`KernelscaleError.exit_code`. Programming errors stay ordinary exceptions.
"""


class KernelscaleError(Exception):
    """Base class of errors caused by input, configuration or state on disk."""

    exit_code = 2


class BadInputError(KernelscaleError):
    """A source file or labels file is unreadable, unsafe or inconsistent."""


class MissingKeysError(BadInputError):
    """A readable file of an input format holds no arrays of the (test, train) names
    asked (``--keys``): e.g. a labels ``.npz`` beside the logits files."""


class ConfigError(KernelscaleError):
    """A job file or command-line option is invalid."""


class StoreError(KernelscaleError):
    """The store is missing, of another schema, or cannot serve the request."""


class KernelOutputError(KernelscaleError):
    """The kernel output path holds something incompatible with the request."""


class CheckpointMismatchError(KernelscaleError):
    """A checkpoint was written for another store, run set, region or precision."""


class MissingInputError(KernelscaleError):
    """A stage of a job would read what no earlier stage made and is not there (a store
    or a finished kernel for ``kernelscale run --only``)."""


class Interrupted(KernelscaleError):
    """A long stage stopped on a signal after saving its state; re-run to resume."""

    #: Exit status of a stage that checkpointed on SIGTERM/SIGUSR1. Slurm wrappers use it
    #: to tell "requeue me" apart from success (0) and failure (other codes).
    exit_code = 75
