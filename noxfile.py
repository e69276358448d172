"""The suite on every CPython procpool supports that this machine has: ``nox`` (all of them)
or ``nox -s tests-3.13``. Extra arguments go to pytest: ``nox -- -k teardown``.

``scripts/test`` stays on one Python (the suite's time budget); this is the wider check, for
code that touches CPython internals (procpool reaches into ``concurrent.futures`` and
``multiprocessing``, and those change between versions).

Supported: ``requires-python`` in pyproject.toml (>= 3.11). ``PYTHONS`` is its oldest and
newest; a version the machine lacks is skipped, not failed (``nox --error-on-missing-interpreters``
makes it fail). Interpreters installed with pyenv are found even when pyenv's shims would not
run them (only the global version is active).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

#: The oldest and the newest CPython procpool supports (requires-python in pyproject.toml).
PYTHONS = ["3.11", "3.13"]

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False

# pyenv installs each version in its own folder, and its shim for python3.X refuses to run a
# version that is not the active one: put the folders of PYTHONS first on PATH so that nox
# finds the interpreters themselves.
_pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
if _pyenv.is_dir():
    _bins = [
        str(folder / "bin")
        for version in PYTHONS
        for folder in sorted(_pyenv.glob(f"{version}.*"))[-1:]
        if (folder / "bin" / f"python{version}").exists()
    ]
    os.environ["PATH"] = os.pathsep.join([*_bins, os.environ.get("PATH", "")])


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Install procpool with the test extra into a fresh virtualenv and run the whole suite."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "auto", *session.posargs)


@nox.session(python=PYTHONS[-1])
def lint(session: nox.Session) -> None:
    """The checked rules of scripts/test on the newest Python."""
    session.install("-e", ".[test]")
    session.run("ruff", "format", "--check", "procpool", "tests", "scripts", "noxfile.py")
    session.run("ruff", "check", "procpool", "tests", "scripts", "noxfile.py")
    session.run("mypy")
