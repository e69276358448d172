# Sourced by scripts/demo and scripts/test: create or refresh .venv and install the project.
# Usage: . scripts/_venv.sh EXTRAS   (EXTRAS: "", "[cli]" or "[test]")
# The install is skipped when .venv/.installed-for says it was made from this very pyproject.toml
# with the same extras (the install is editable: code changes need no reinstall).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    rm -rf .venv
    "$python" -m venv .venv
fi
stamp="$1 $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat .venv/.installed-for 2>/dev/null || true)" != "$stamp" ]; then
    rm -f .venv/.installed-for
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$1"
    printf '%s\n' "$stamp" > .venv/.installed-for
fi
