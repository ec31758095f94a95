"""The errors the app names to a user, and how a command ends on them (its message, exit code 2, no traceback).
Imports no torch."""

import functools
import logging
import sys
import unicodedata
from collections.abc import Callable

from PIL import Image

logger = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """No local weights and the hub could not provide them. The message says what to do."""


class TorchWithoutCudaError(ModelNotAvailableError):
    """The machine has an NVIDIA GPU that torch cannot use; the message gives the fix (`main` prints it, exit 2)."""


class OutOfMemoryError(RuntimeError):
    """The GPU ran out of memory during a run; the message says which setting to change."""


class RunStopped(RuntimeError):
    """The run's `stop` event was set (Stop pressed, or the client left); it ended at the next step, memory freed."""


STOPPED_MESSAGE = "Stopped: the run ended at the next step and its memory was freed. Nothing was saved."
# What ends a command with its message and exit code 2, never a traceback: the user's mistakes (ValueError names
# the value and the fix), missing weights, and the machine's limits (GPU or host memory, a busy port, a full disk).
USER_ERRORS = (ValueError, ModelNotAvailableError, OutOfMemoryError, OSError, Image.DecompressionBombError)


def terminal_safe(text: str) -> str:
    """`text` as a terminal may print it: control characters (ESC, CR, BEL ...) and invisible format characters (a
    right-to-left override) are written as escapes, so a file name cannot move the cursor, recolour or clear the
    screen, or reorder what follows; line breaks stay."""
    return "".join(c if c == "\n" or unicodedata.category(c) not in ("Cc", "Cf")
                   else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def exits_with_message(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a `main(argv)`: a USER_ERRORS exception prints `error: <message>` to stderr and returns 2.
    Used by the app's and both tools' `main`; anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except USER_ERRORS as err:
            logger.debug("stopped by a user error", exc_info=True)
            print(terminal_safe(f"error: {err}"), file=sys.stderr)
            return 2
    return run
