"""Errors that jaxmed raises for problems in the user's data rather than in the code."""


class InputDataError(ValueError):
    """Bad user input: a missing, unreadable or inconsistent data file, folder or manifest.

    The message always names the offending file (or folder) and the problem, so that a training
    program can catch this at its entry point, print the message and exit non-zero without a
    traceback.
    """
