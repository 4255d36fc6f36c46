"""The documentation stays true: README.md is a short front door, every relative link (and image) in
README.md and docs/**/*.md reaches a file (and, with ``#anchor``, a heading of it), and every command
in their shell code blocks names a script or module that exists and options its parser accepts
(``test_docs_commands``).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 260


def doc_files() -> List[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------- markdown parsing

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}


def blocks(path: Path) -> Iterator[Tuple[str, int, List[str]]]:
    """The fenced code blocks of ``path``: (language, line number of the first content line, lines)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start, body = m.group(2), m.group(3).lower(), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield lang, start, body
        i += 1


def prose_lines(path: Path, keep_code: bool = False) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out (kept
    with ``keep_code``: a heading's anchor includes its text)."""
    in_fence: Optional[str] = None
    for no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        m = FENCE.match(line)
        if in_fence is None and m:
            in_fence = m.group(2)
            continue
        if in_fence is not None:
            if line.strip().startswith(in_fence):
                in_fence = None
            continue
        yield no, line if keep_code else re.sub(r"(`+)(?:(?!\1).)+\1", lambda s: " " * len(s.group(0)), line)


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower case, punctuation other than ``-`` and
    ``_`` removed, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen: Dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path, keep_code=True):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> Iterator[Tuple[int, str]]:
    for no, line in prose_lines(path):
        for m in LINK.finditer(line):
            yield no, m.group(1)


# ----------------------------------------------------------------------------- (a) the front door


def test_readme_is_a_front_door():
    n = len(README.read_text(encoding="utf-8").rstrip("\n").split("\n"))
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


def test_readme_starts_with_the_two_commands():
    head = README.read_text(encoding="utf-8").split("\n")[:20]
    assert any(line.startswith("make bench") for line in head) and any(line.startswith("make test") for line in head)


def test_the_readme_study_tables_are_the_results_doc_s():
    """The headline tables in the README are copies of docs/results.md's: every row the same."""
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    section = text.split("## When to use it", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.split("\n") if line.startswith("| ")]
    assert len(rows) >= 10
    missing = [row for row in rows if row not in results]
    assert not missing, "README.md rows missing from docs/results.md:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- (b) links


def all_links() -> List[Tuple[Path, int, str]]:
    return [(path, no, target) for path in doc_files() for no, target in links(path)]


def test_there_are_links_to_check():
    assert len(all_links()) > 50 and (ROOT / "docs" / "architecture.md").exists()


def link_problem(path: Path, target: str) -> Optional[str]:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    dest = path if not file_part else (path.parent / file_part).resolve()
    if file_part:
        try:
            dest.relative_to(ROOT)
        except ValueError:
            return f"points outside the repository: {target}"
        if not dest.exists():
            return f"no such file: {target}"
    if anchor:
        if dest.is_dir() or dest.suffix.lower() != ".md":
            return f"an anchor into a file that is not markdown: {target}"
        if anchor not in anchors(dest):
            return f"no heading #{anchor} in {rel(dest)}"
    return None


def test_every_relative_link_and_image_resolves():
    problems = []
    for path, no, target in all_links():
        why = link_problem(path, target)
        if why:
            problems.append(f"{rel(path)}:{no}: [{target}] {why}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_catches_a_broken_link_and_anchor(tmp_path):
    doc = ROOT / "docs" / "results.md"
    assert link_problem(doc, "../examples/no_such_file.py") == "no such file: ../examples/no_such_file.py"
    assert "no heading #no-such-heading" in link_problem(doc, "../README.md#no-such-heading")
    assert link_problem(doc, "../README.md#when-to-use-it") is None
    assert link_problem(doc, "#where-each-stands") is None
    assert github_slug("Memory: what is held (`capture=`, `capture_budget=`)") == "memory-what-is-held-capture-capture_budget"
    assert github_slug("How ScaledOPLoRA's defaults were chosen") == "how-scaledoploras-defaults-were-chosen"
    assert github_slug("Layer kinds, QLoRA, torch.compile and copies") == "layer-kinds-qlora-torchcompile-and-copies"
