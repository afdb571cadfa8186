"""What every command shares: the stderr console, error mapping, and option bundles."""

from __future__ import annotations

import functools
import os
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
    """``text`` cut in the middle to ``width`` characters: a path keeps its file name whole (what
    tells photos apart) and as much of its start as fits; a name longer than that loses its own
    middle."""
    if width < 5 or len(text) <= width:
        return text
    cut = max(text.rfind("/"), text.rfind(os.sep))
    if cut > 0:
        tail = text[cut:]
        if len(tail) + 2 <= width:
            return text[: width - 1 - len(tail)] + "\u2026" + tail
        return "\u2026" + _cut_middle(text[cut + 1 :], width - 1)  # the name alone, cut
    return _cut_middle(text, width)


def _cut_middle(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    tail = (width - 1) // 2 + (width - 1) % 2
    return text[: width - 1 - tail] + "\u2026" + text[-tail:]


class PathCell:
    """A path in a rich table column: when the column is narrower than the path, the path loses
    its middle (:func:`middle_ellipsis`) instead of being folded across lines mid-name.
    ``suffix`` (a note such as " (truncated image)") is kept whole after it."""

    def __init__(self, path: str, suffix: str = ""):
        self.path, self.suffix = path, suffix

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        full = len(self.path) + len(self.suffix)
        name = len(os.path.basename(self.path)) + len(self.suffix) + 2
        return Measurement(min(full, max(12, name)), full).clamp(max_width=options.max_width)

    def __rich_console__(self, console, options):
        from rich.text import Text

        width = options.max_width
        suffix = self.suffix
        if len(suffix) > width - 8:  # the note gives way before the path's last 8 characters
            suffix = suffix[: max(0, width - 9)] + "\u2026" if width > 9 else ""
        room = max(5, width - len(suffix))
        yield Text(middle_ellipsis(self.path, room) + suffix)

    def __str__(self) -> str:
        return self.path + self.suffix


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 file', '2 files'."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def shown(text: str) -> str:
    """A file name made safe for the terminal (display only; outputs keep the exact bytes):
    undecodable bytes, controls (a name's ESC would start a terminal escape sequence), line
    separators and bidirectional overrides escaped (:func:`loda_cli.organize.paths.display_path`)."""
    from loda_cli.organize.paths import display_path

    return display_path(text)


def write_stdout_line(line: str) -> None:
    """Write a line to stdout keeping a file name's exact bytes (non-UTF-8 names included)."""
    data = (line + "\n").encode("utf-8", "surrogateescape")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        sys.stdout.flush()
        buffer.write(data)
        buffer.flush()
    else:
        # No byte stream under it: the text as is, undecodable bytes as U+FFFD (data, not display).
        sys.stdout.write(line.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\n")


def own_folders_note(folders: list[str], what: str) -> str:
    """The line that says which of loda's own folders (culled or sorted photos) a command left out."""
    return (f"not {what}: loda's own {'folder' if len(folders) == 1 else 'folders'} "
            + ", ".join(shown(f) for f in folders)
            + " (culled or sorted photos; name a folder as a path to include it)")


def notice(message: str, quiet: bool = False) -> None:
    if not quiet:
        err_console.print(message, soft_wrap=True)


def announce_generation(spec, root) -> None:
    """Before a command reads the ``synthetic`` dataset: say what it is about to generate (GBs of
    images, minutes), if anything."""
    if root is None or spec.name != "synthetic":
        return
    from loda_cli.synthetic import pending_generation

    message = pending_generation(root)
    if message:
        err_console.print(message + " ...", markup=False, soft_wrap=True)


def print_precision_choice(choice) -> None:
    """The measured precision table, when ``--precision auto`` measured (now or earlier)."""
    if choice.measured:
        err_console.print(f"precision: {choice.describe()}", markup=False, soft_wrap=True)


def check_score_cache() -> None:
    """Before a run that reads the score cache: a cache file SQLite cannot read is set aside
    (renamed, never deleted) and a fresh one starts; say so, since every photo scores again."""
    from loda_cli.cache import default_cache_path, set_aside_if_damaged

    path = default_cache_path()
    aside = set_aside_if_damaged(path)
    if aside is not None:
        err_console.print(
            f"warning: the score cache {shown(str(path))} is damaged (not a database SQLite can read); "
            f"set aside as {aside.name}; a new cache starts, so photos are scored again",
            style="yellow", markup=False, soft_wrap=True,
        )


def measuring_precision_notice() -> None:
    err_console.print("choosing a precision: timing this model in fp32, bf16, fp16 and int8 on a few crops "
                      "(once per model and machine) ...", markup=False, soft_wrap=True)


def _os_error_line(exc: OSError) -> str:
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return what
    name = shown(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes)) else str(exc.filename)
    return f"{name}: {what}"


def _one_line(message: str) -> str:
    """The message itself when a DataLoader worker raised it: torch re-raises the error in the
    main process as "Caught X in DataLoader worker process N.", the worker's traceback, and last
    "module.X: message"."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    name, sep, text = last.partition(": ")
    return text if sep and "." in name and " " not in name else last


def handle_errors(fn: F) -> F:
    """Turn the library's typed errors into a one-line message and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LodaError as exc:
            raise fail(_one_line(str(exc)), exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(0) from None
        except OSError as exc:
            # What the system refused where loda has no error of its own for it (a name too
            # long for the disk, a disk gone): one line that names the file, not a traceback.
            raise fail(_os_error_line(exc)) from None

    return wrapper  # type: ignore[return-value]
