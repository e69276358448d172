"""Argument checks shared by pools, workqueues and teardown: bad input gets an error that
names the argument and what it was, before anything is started."""

from __future__ import annotations

import math
import os
from typing import Any


def check_number(name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


def check_name(name: str, value: Any) -> None:
    """A title, title prefix or workqueue name: a non-empty string of printable characters
    without spaces. Titles go into argv (a NUL would cut it: every worker would die at start)
    and all three are shown by ps, htop and ``procpool ps`` (a newline or an escape sequence
    would forge lines or drive the terminal)."""
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be a non-empty string without spaces, got {value!r}")
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{name} must not contain control characters, got {bad!r} in {value!r}")


def check_attrs(nice: Any, cpus: Any) -> tuple[int, frozenset[int] | None]:
    """Validate pool attributes (the kernel's workqueue_attrs); returns them normalized.

    ``nice`` is a delta each worker adds to the niceness it inherits, within the OS range
    (-20..19); ``cpus`` a non-empty subset of the CPUs this process may run on."""
    if isinstance(nice, bool) or not isinstance(nice, int):
        raise TypeError(f"nice must be an int, got {nice!r}")
    if not -20 <= nice <= 19:
        raise ValueError(f"nice must be within -20..19, got {nice}")
    if cpus is None:
        return nice, None
    cpus = frozenset(cpus)
    if not cpus:
        raise ValueError("cpus must not be empty (None means: the CPUs this process may use)")
    allowed = os.sched_getaffinity(0)
    for cpu in sorted(cpus, key=repr):
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu not in allowed:
            raise ValueError(f"cpus: CPU {cpu!r} is not one this process may use ({sorted(allowed)})")
    return nice, cpus
