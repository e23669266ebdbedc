"""libtpu's figures for each compiled training step, remembered by program and compiler.

Compiling a pod-scale step for a TPU topology takes libtpu one to four CPU-minutes, and what
it reports (temporaries, code size, cost analysis, or its out-of-memory message) depends only
on the program and the compiler. :class:`CompilerFigures` keeps those figures under
:func:`program_key` (the program with its constants blanked, the slice's accelerator type, the
libtpu, jax and jaxlib versions and the compiler flags in the environment). Within a session,
steps that differ only in constants (a learning rate, a seed) compile once. With a ``folder``
(``mythos-jax plan --store DIR``), a later session reuses what an earlier one compiled, one
JSON file per key. Files are written atomically. A file that is not such a record (bad JSON,
another key, a missing or mistyped field) is reported in one line and compiled again.
Thread-safe: callers asking for one key at once compile it once.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import threading
from typing import Callable

from mythos_jax import paths

FIGURES = {"temporaries": (int,), "generated_code": (int,), "compiler_message": (str, type(None)),
           "flops": (int, float, type(None)), "bytes_accessed": (int, float, type(None)),
           "compile_seconds": (int, float)}
FROM_LIBTPU, FROM_STORE = "libtpu", "store"
_ENVIRONMENT = ("LIBTPU_INIT_ARGS", "XLA_FLAGS")


def program_key(program: str, accelerator: str, libtpu: str | None) -> str:
    """sha256 (hex) of the program text (constants blanked), the accelerator type (``v4-8``),
    the libtpu, jax and jaxlib versions and the compiler flags of the environment."""
    import jax
    import jaxlib

    parts = [program, accelerator, str(libtpu), jax.__version__, jaxlib.__version__,
             *(os.environ.get(name, "") for name in _ENVIRONMENT)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class CompilerFigures:
    """The compiler's figures by :func:`program_key`, for one session and, with ``folder``,
    across sessions. ``get`` gives them with where they came from (``FROM_LIBTPU`` or
    ``FROM_STORE``)."""

    def __init__(self, folder: str | None = None):
        self.folder = folder
        self._lock = threading.Lock()
        self._entries: dict[str, concurrent.futures.Future] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, compile_program: Callable[[], dict],
            may_compile: Callable[[], bool] = lambda: True) -> tuple[dict, str] | None:
        """``key``'s figures and their source: remembered, read from the folder, or
        ``compile_program()``'s (then kept) when ``may_compile()``; None when it may not."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                owner = False
            else:
                owner, entry = True, concurrent.futures.Future()
                self._entries[key] = entry
        if not owner:
            return entry.result()
        try:
            found = self._read(key)
            if found is None and may_compile():
                found = (compile_program(), FROM_LIBTPU)
                self._write(key, found[0])
        except BaseException as err:
            self._forget(key)
            entry.set_exception(err)
            raise
        if found is None:
            self._forget(key)          # a later call, with time left, may compile it
        entry.set_result(found)
        return found

    def _forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.json")

    def _read(self, key: str) -> tuple[dict, str] | None:
        if self.folder is None or not os.path.exists(self._path(key)):
            return None
        try:
            record = json.loads(paths.read_text(self._path(key)))
            problem = _problem(record, key)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problem = f"unreadable ({type(err).__name__})"
        if problem:
            print(f"plan store: ignoring {self._path(key)}: {problem}; compiling again",
                  file=sys.stderr, flush=True)
            return None
        return record["figures"], FROM_STORE

    def _write(self, key: str, figures: dict) -> None:
        if self.folder is None:
            return
        os.makedirs(self.folder, exist_ok=True)
        paths.write_text(self._path(key), json.dumps({"key": key, "figures": figures}) + "\n")


def _problem(record, key: str) -> str | None:
    """What makes ``record`` not a store record for ``key`` (None: nothing)."""
    if not isinstance(record, dict) or record.get("key") != key:
        return "not a record of this program"
    figures = record.get("figures")
    if not isinstance(figures, dict) or set(figures) != set(FIGURES):
        return f"its figures must be exactly {sorted(FIGURES)}"
    for field, types in FIGURES.items():
        value = figures[field]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"figures.{field} has the wrong type ({type(value).__name__})"
        if isinstance(value, (int, float)) and not 0 <= value < float("inf"):
            return f"figures.{field} must be a finite number >= 0, got {value}"
    return None
