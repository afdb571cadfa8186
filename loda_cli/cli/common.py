"""What every command shares: the stderr console, error mapping, and option bundles."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from loda_cli.errors import LodaError

F = TypeVar("F", bound=Callable[..., Any])

# Progress, notices and summaries go to stderr so stdout stays clean for data (`--out -`).
err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def shown(text: str) -> str:
    """A file name made safe for the terminal: undecodable bytes become U+FFFD (display only;
    outputs keep the exact bytes)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def write_stdout_line(line: str) -> None:
    """Write a line to stdout keeping a file name's exact bytes (non-UTF-8 names included)."""
    data = (line + "\n").encode("utf-8", "surrogateescape")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        sys.stdout.flush()
        buffer.write(data)
        buffer.flush()
    else:
        sys.stdout.write(shown(line) + "\n")


def notice(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(message, soft_wrap=True)


def handle_errors(fn: F) -> F:
    """Turn the library's typed errors into a one-line message and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LodaError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]
