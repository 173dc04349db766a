"""Errors a user can cause: reported as one clear message and a non-zero exit, never a traceback."""


class ModeError(Exception):
    """An error in the user's input (config, data, paths, hardware): shown without a traceback."""
