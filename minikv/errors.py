"""The errors minikv raises when it refuses an input. Each message names the offending value and what would be valid.

They subclass the built-in exceptions a Python caller already expects (`ValueError`, `FileNotFoundError`,
`ImportError`), so `except ValueError` keeps working; the command line turns exactly these into one line
`minikv: error: ...` with exit status 2. Any other exception is a bug in minikv and keeps its traceback."""
from __future__ import annotations

from numbers import Integral

class MinikvError(Exception):
    """Base of every error that means "the input is wrong", not "minikv is broken"."""

class BadInput(MinikvError, ValueError):
    """A value out of range, of the wrong kind, or inconsistent with another (budget, option, config key, file)."""

class NotFound(MinikvError, FileNotFoundError):
    """A file or folder the input names does not exist (model folder, weights, golden set, data file)."""

class MissingExtra(MinikvError, ImportError):
    """An optional dependency is not installed; the message names the `pip install` that adds it."""

class NoDevice(MinikvError, RuntimeError):
    """The requested device (e.g. a CUDA GPU) is not available on this machine."""

def is_int(x) -> bool:
    """An integer that is not a bool (isinstance(True, int) holds, but True is never a count, size or token id)."""
    return isinstance(x, Integral) and not isinstance(x, bool)
