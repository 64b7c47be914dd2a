"""One error type for problems in user-supplied input.

Anything that is wrong with a file, a path or a config value raises :class:`InputError` with a one-line
message that names the file or field and says how to fix it. The entry point prints that line and exits
non-zero without a traceback.
"""


class InputError(ValueError):
    """A user-facing problem with an input file or a config value (one line: what, where, how to fix)."""


class TrainingError(RuntimeError):
    """A run that cannot go on without producing an untrustworthy result (NaN/Inf loss, gradient or volume).

    One line: what happened, where (step, file) and what to do; the entry point prints it and exits non-zero.
    """
