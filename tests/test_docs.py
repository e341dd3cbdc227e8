"""The README and docs/ stand alone: every link, and every document they or the code name, is in the
repository, and every section of docs/DESIGN.md that the code cites exists."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")
# Markdown files that the tools write into a run's directory, named in the prose but not documents here.
WRITTEN_BY_THE_TOOLS = {"results.md"}

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)  # [label]: target
_NAMED = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
_CITED = re.compile(r"DESIGN\.md,? (\d+(?:\.\d+)?)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The anchors of the headings of the Markdown file `path` (repeats get GitHub's `-1`, `-2`)."""
    seen, out = {}, set()
    for line in _prose(open(path, encoding="utf-8").read()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def inside(path: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep)


def _broken_links(doc: str) -> list[str]:
    text = _prose(open(doc, encoding="utf-8").read())
    broken = []
    for target in _LINK.findall(text) + _REFERENCE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not inside(resolved) or not os.path.exists(resolved):
            broken.append(f"{target}: no file {os.path.relpath(resolved, ROOT)} in the repository")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(resolved, ROOT)}")
    return broken


def _repository_files() -> set[str]:
    """Every file of the repository (paths relative to it), without virtual environments and caches."""
    skip = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist"}
    files = set()
    for directory, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info") and not d.startswith(".")]
        files.update(os.path.relpath(os.path.join(directory, n), ROOT) for n in names)
    return files


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves_inside_the_repository(doc):
    assert not _broken_links(doc), "\n".join(_broken_links(doc))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_document_named_is_in_the_repository(doc):
    files = _repository_files()
    basenames = {os.path.basename(f) for f in files}
    text = _prose(open(doc, encoding="utf-8").read())
    missing = sorted({name for name in _NAMED.findall(text)
                      if os.path.basename(name) not in WRITTEN_BY_THE_TOOLS | basenames
                      and not os.path.exists(os.path.join(os.path.dirname(doc), name))})
    assert not missing, f"{os.path.relpath(doc, ROOT)} names documents that are not in the repository: {missing}"


def test_every_design_section_the_code_cites_exists():
    assert os.path.exists(DESIGN), "docs/DESIGN.md is missing"
    headings = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", open(DESIGN, encoding="utf-8").read(), re.M)
    cited = {}
    for rel in sorted(_repository_files()):
        if rel.endswith((".py", ".md", ".ipynb", ".toml")) and rel != os.path.relpath(__file__, ROOT):
            for number in _CITED.findall(open(os.path.join(ROOT, rel), encoding="utf-8").read()):
                cited.setdefault(number, []).append(rel)
    assert cited  # the modules do cite it
    unknown = {n: where for n, where in cited.items() if n not in headings}
    assert not unknown, f"sections cited but not in docs/DESIGN.md (its sections: {headings}): {unknown}"


def test_slug_matches_githubs_anchors():
    assert slug("`low_dose` scored against the truth (256 test samples, K = 16)") == \
        "low_dose-scored-against-the-truth-256-test-samples-k--16"
    assert slug("2.3 RMAS, DMM and the positive/negative views") == "23-rmas-dmm-and-the-positivenegative-views"
