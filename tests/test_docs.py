"""The documentation holds together: every relative link in README.md, docs/*.md and the results
index points at a file that exists and, with a #fragment, at a heading there (GitHub's anchors);
the README stays a front page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md",
            ROOT / "results" / "history.md"]


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[*`_]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in _prose(path.read_text()):
        if m := re.match(r"#{1,6} (.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for line in _prose(page.read_text()):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(root)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return broken


def test_every_relative_link_in_the_docs_points_somewhere():
    assert not [b for page in pages() for b in broken_links(page)]


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [gone](missing.md) [no heading](a.md#nowhere)\n"
                                   "```\n[in code](ignored.md)\n```\n")
    assert broken_links(tmp_path / "a.md", tmp_path) == ["a.md: missing.md (no such file)",
                                                         "a.md: a.md#nowhere (no such heading)"]


def test_anchors_follow_github():
    assert slug("Measured on the cap + stuck default, not adopted (2026-12-05)") == \
        "measured-on-the-cap--stuck-default-not-adopted-2026-12-05"
    assert slug("8,000 env steps (the earlier default)") == "8000-env-steps-the-earlier-default"
    assert slug("The `carla` backend") == "the-carla-backend"


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


def test_the_results_index_lists_every_report():
    index = (ROOT / "results" / "README.md").read_text()
    reports = {p.name for p in (ROOT / "results").glob("*.md")} - {"README.md", "history.md"}
    assert not [name for name in sorted(reports) if f"]({name})" not in index]
