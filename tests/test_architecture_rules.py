"""Rules of the code's shape that a reviewer would otherwise check by eye, read from the source
with ``ast`` and the documents as text (no process is started):

* no function or method in ``procpool/`` is longer than ``MAX_FUNCTION_LINES`` and no class
  longer than ``MAX_CLASS_LINES`` (decorators and docstrings count: it is what a reader scrolls);
* every relative link in README.md and docs/*.md names a file or folder inside the repository.

``KNOWN_OFFENDERS`` lists what was over the limits when the rule came in (issue 12), each with
who is shrinking it. It may only shrink: an entry that is no longer over its limit fails the
test too, so whoever fixes an offender also deletes its line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "procpool"

MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 400

#: (path relative to the repository, qualified name) of what is over its limit today, and who
#: takes it down. TEMPORARY: the lead shrinks this list as the branches of issue 12 merge.
KNOWN_OFFENDERS: dict[tuple[str, str], str] = {}


def _spans(tree: ast.AST, prefix: str = "") -> list[tuple[str, str, int, int]]:
    """(kind, qualified name, first line, length) of every function and class in ``tree``,
    nested ones included (``Outer.method``, ``func.inner``). A decorated definition starts at
    its first decorator."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            out.append((kind, name, first, node.end_lineno - first + 1))
            out.extend(_spans(node, f"{name}."))
        else:
            out.extend(_spans(node, prefix))
    return out


def too_long(source: str) -> dict[str, tuple[str, int, int]]:
    """Qualified name -> (kind, first line, length) of what in ``source`` is over its limit."""
    limits = {"function": MAX_FUNCTION_LINES, "class": MAX_CLASS_LINES}
    return {
        name: (kind, first, length) for kind, name, first, length in _spans(ast.parse(source)) if length > limits[kind]
    }


def _package_offenders() -> dict[tuple[str, str], tuple[str, int, int]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name, what in too_long(path.read_text(encoding="utf-8")).items():
            found[(rel, name)] = what
    return found


def test_the_length_rule_sees_long_functions_methods_and_classes() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = (
        f"def short():\n    pass\n\n"
        f"@staticmethod\ndef long_one():\n{body}\n\n"
        f"class C:\n    def method(self):\n{body.replace('    ', '        ')}\n"
    )
    assert set(too_long(source)) == {"long_one", "C.method"}
    assert too_long(source)["long_one"] == ("function", 4, MAX_FUNCTION_LINES + 2)  # from the decorator
    big_class = "class Big:\n" + "\n".join(f"    a{i} = {i}" for i in range(MAX_CLASS_LINES))
    assert set(too_long(big_class)) == {"Big"}


def test_no_function_over_80_lines_and_no_class_over_400_in_procpool() -> None:
    found = _package_offenders()
    new = {key: what for key, what in found.items() if key not in KNOWN_OFFENDERS}
    assert not new, "\n".join(
        f"{path}:{first}: {kind} {name} is {length} lines (limit {MAX_FUNCTION_LINES} for a function, "
        f"{MAX_CLASS_LINES} for a class): split it"
        for (path, name), (kind, first, length) in sorted(new.items())
    )
    fixed = sorted(set(KNOWN_OFFENDERS) - set(found))
    assert not fixed, f"no longer over the limit (or gone): delete from KNOWN_OFFENDERS: {fixed}"


# -- relative links in the documents ---------------------------------------------------------

#: Inline links and images, [text](target) and ![alt](target), and reference definitions
#: ([label]: target). Code spans and fenced blocks are removed first.
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(markdown: str) -> list[str]:
    """The link targets of ``markdown`` that point into the repository: no scheme
    (http:, mailto:, ...), not a bare #anchor; the #anchor and ?query are cut off."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = _INLINE.findall(text) + _REFERENCE.findall(text)
    out = []
    for target in targets:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue
        out.append(re.split(r"[#?]", target, maxsplit=1)[0])
    return out


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_link_rule_finds_relative_links_only() -> None:
    md = (
        'See [design](docs/design.md#locks), ![pic](img/a.svg "title"), [web](https://example.org),\n'
        "[mail](mailto:a@b), [here](#top), `[not](a-link.md)`.\n\n"
        "```\n[also not](b.md)\n```\n[ref]: ../LICENSE\n"
    )
    assert relative_links(md) == ["docs/design.md", "img/a.svg", "../LICENSE"]


def test_the_documents_exist_and_the_readme_links_the_design() -> None:
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in relative_links((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    broken = []
    for target in relative_links(doc.read_text(encoding="utf-8")):
        resolved = (doc.parent / target).resolve()
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            broken.append(f"{target} (no such file)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"
