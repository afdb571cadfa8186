"""What every command shares: the stderr console, error mapping, and option bundles."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console, ConsoleDimensions

from loda_cli.errors import LodaError

F = TypeVar("F", bound=Callable[..., Any])

# Wide enough that no message or table row is ever broken, yet small enough for rich to lay out.
_UNWRAPPED_WIDTH = 10_000


class _Console(Console):
    """A console that wraps to the terminal's width, and not at all when it writes to a log, a
    pipe or a file: rich's 80-column default would break every long line and cut long paths."""

    @property
    def size(self) -> ConsoleDimensions:
        if not self.is_terminal:  # COLUMNS describes a terminal, not a log file
            return ConsoleDimensions(_UNWRAPPED_WIDTH, self._height or 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


# Progress, notices and summaries go to stderr so stdout stays clean for data (`--out -`).
err_console = _Console(stderr=True, highlight=False)
out_console = _Console(highlight=False)


def middle_ellipsis(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters: a path keeps its start and its file
    name, which are what tell photos apart."""
    if width < 5 or len(text) <= width:
        return text
    tail = (width - 1) // 2 + (width - 1) % 2
    head = width - 1 - tail
    return text[:head] + "\u2026" + text[-tail:]


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


def print_precision_choice(choice) -> None:
    """The measured precision table, when ``--precision auto`` measured (now or earlier)."""
    if choice.measured:
        err_console.print(f"precision: {choice.describe()}", markup=False, soft_wrap=True)


def measuring_precision_notice() -> None:
    err_console.print("choosing a precision: timing this model in fp32, bf16, fp16 and int8 on a few crops "
                      "(once per model and machine) ...", markup=False, soft_wrap=True)


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
