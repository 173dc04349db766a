"""Errors a user can cause: reported as one clear message and a non-zero exit, never a traceback."""

# The exit status of a user error: a bad recipe, key, data file, path or hardware option.
EXIT_USER_ERROR = 2


class ModeError(Exception):
    """An error in the user's input (config, data, paths, hardware): shown without a traceback,
    and the command exits with `exit_code` (2 unless the error is a job that failed otherwise)."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code
