"""Shared behaviour of the entry scripts: a user error prints one actionable line on stderr and exits with code 2."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from .data import DatasetError
from .models import ModelNotFoundError
from .registry import MethodNotImplementedError, UnknownMethodError

USER_ERRORS = (DatasetError, ModelNotFoundError, UnknownMethodError, MethodNotImplementedError, FileNotFoundError,
               FileExistsError, ValueError)


@contextmanager
def exit_on_user_error():
    try:
        yield
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
