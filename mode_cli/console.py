"""Where the commands print: one rich console for status (stderr) and one for results (stdout).

Library code (`mode_cli.mode`, `models`, `data`, `artifacts`) does not print: it returns values,
raises `ModeError`, and logs notes and warnings on the `mode_cli` logger. The command line
(`cli.main`) shows those records on this console with `show_library_messages`.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.markup import escape

# Both resolve sys.stderr / sys.stdout when they print, so redirections (and pytest) see them.
console = Console(stderr=True)
out = Console()


class ConsoleHandler(logging.Handler):
    """Log records on the status console: notes dim, warnings yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = escape(self.format(record))
            if record.levelno >= logging.WARNING:
                message = f"[yellow]{message}[/yellow]"
            elif record.levelno <= logging.INFO:
                message = f"[dim]{message}[/dim]"
            console.print(message, soft_wrap=True, highlight=False)
        except Exception:  # a logging handler must never raise into the code that logged
            self.handleError(record)


def show_library_messages() -> None:
    """Route the `mode_cli` logger's notes (INFO) and warnings to the status console, once."""
    logger = logging.getLogger("mode_cli")
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
