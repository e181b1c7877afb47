"""The docs: the MkDocs site builds with warnings as errors, every page is in its nav, the
README's relative links reach real files (and headings), and the module paths the docs name
import. Each checker is also run on a planted mistake, so a check that cannot fail shows."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target)
MODULE_PATH = re.compile(r"\bmlx_interp(?:\.[A-Za-z_]\w*)+")
TEST_REF = re.compile(r"\btests/[\w/]+\.py(?:::\w+)?")  # tests/x/test_y.py::test_z
NOT_MODULE_PATHS = {"mlx_interp.log"}  # the run log's file name
LAYOUT_PAGE = "layout.md"  # its old -> new table also names modules other helpers are adding


def nav_pages(nav) -> list[str]:
    """The page paths of an mkdocs ``nav`` (nested lists of {title: path or list})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def orphans_and_missing(docs: Path, nav) -> tuple[list[str], list[str]]:
    """(pages under ``docs`` missing from the nav, nav entries with no file)."""
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    listed = {p for p in nav_pages(nav) if not re.match(r"^[a-z]+://", p)}
    return sorted(pages - listed), sorted(listed - pages)


def slugify(heading: str) -> str:
    """A heading's anchor as MkDocs' toc extension makes it (ASCII, no punctuation, dashes)."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", heading))
    text = re.sub(r"[^\w\s-]", "", text.encode("ascii", "ignore").decode()).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def headings(markdown_file: Path) -> list[str]:
    """The ATX headings of a Markdown file, outside fenced code."""
    text = re.sub(r"^```.*?^```", "", markdown_file.read_text(), flags=re.S | re.M)
    return re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)


def slugs(markdown_file: Path) -> set[str]:
    """Anchors of the headings of a Markdown file."""
    return {slugify(h) for h in headings(markdown_file)}


def broken_links(markdown_file: Path) -> list[str]:
    """Relative links of ``markdown_file`` whose file, or heading anchor, does not exist."""
    text = re.sub(r"^```.*?^```", "", markdown_file.read_text(), flags=re.S | re.M)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor in this file
        path, _, anchor = target.partition("#")
        dest = (markdown_file.parent / path).resolve()
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def unresolved_module_paths(text: str) -> list[str]:
    """``mlx_interp.a.b.name`` references in ``text`` that do not import / getattr."""
    bad = []
    for ref in sorted(set(MODULE_PATH.findall(text)) - NOT_MODULE_PATHS):
        parts = ref.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        else:
            bad.append(ref)
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                bad.append(ref)
                break
            obj = getattr(obj, name)
    return bad


def missing_test_refs(text: str, root: Path) -> list[str]:
    """``tests/...py`` (``::test_name``) references in ``text`` with no such file or test."""
    bad = []
    for ref in sorted(set(TEST_REF.findall(text))):
        path, _, name = ref.partition("::")
        file = root / path
        if not file.is_file() or (
            name and not re.search(rf"^def {name}\(", file.read_text(), re.M)
        ):
            bad.append(ref)
    return bad


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[dev]'")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML)]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "guides" / "color_swap" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    nav = yaml.safe_load(MKDOCS_YML.read_text())["nav"]
    orphans, missing = orphans_and_missing(DOCS, nav)
    assert not orphans, f"pages not in mkdocs.yml's nav: {orphans}"
    assert not missing, f"nav entries without a file under docs/: {missing}"


def test_the_nav_check_finds_a_planted_orphan_and_a_planted_missing_page(tmp_path):
    (tmp_path / "guides").mkdir()
    for name in ("index.md", "guides/a.md", "guides/orphan.md"):
        (tmp_path / name).write_text("# page\n")
    nav = [{"Home": "index.md"}, {"Guides": [{"A": "guides/a.md"}, {"Gone": "gone.md"}]}]
    assert orphans_and_missing(tmp_path, nav) == (["guides/orphan.md"], ["gone.md"])


def test_every_relative_link_in_the_readme_reaches_a_file_and_heading():
    assert not broken_links(README), f"broken links in README.md: {broken_links(README)}"


def test_the_link_check_finds_planted_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A heading\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#a-heading) [web](https://example.org/x.md)\n"
        "[gone](docs/gone.md) [bad anchor](docs/page.md#no-such-heading)\n"
        "```\n[in a code block](docs/ignored.md)\n```\n"
    )
    found = broken_links(readme)
    assert len(found) == 2
    assert found[0].startswith("docs/gone.md") and found[1].startswith("docs/page.md#no-such")


def test_our_anchors_are_the_ones_mkdocs_makes():
    toc = pytest.importorskip("markdown.extensions.toc", reason="markdown (with mkdocs) absent")
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    titles = [h for page in pages for h in headings(page)]
    assert len(titles) > 50
    for title in titles:  # markdown strips the code/emphasis marks before it slugifies
        assert slugify(title) == toc.slugify(re.sub(r"[`*]", "", title), "-"), title


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines: move detail into docs/"


def test_the_module_paths_the_docs_name_import():
    texts = [README.read_text()]
    texts += [p.read_text() for p in sorted(DOCS.rglob("*.md")) if p.name != LAYOUT_PAGE]
    bad = unresolved_module_paths("\n".join(texts))
    assert not bad, f"README/docs name module paths that do not import: {bad}"


def test_the_module_path_check_finds_a_planted_stale_name():
    text = "`mlx_interp.analysis.directions.MeanDiff` and `mlx_interp.analysis.directons.MeanDiff`"
    assert unresolved_module_paths(text) == ["mlx_interp.analysis.directons.MeanDiff"]


def test_the_tests_the_docs_cite_exist():
    texts = [README.read_text()] + [p.read_text() for p in sorted(DOCS.rglob("*.md"))]
    bad = missing_test_refs("\n".join(texts), ROOT)
    assert not bad, f"README/docs cite tests that do not exist (moved?): {bad}"


def test_the_test_reference_check_finds_planted_stale_references(tmp_path):
    (tmp_path / "tests" / "engine").mkdir(parents=True)
    (tmp_path / "tests" / "engine" / "test_scale.py").write_text("def test_locks():\n    pass\n")
    text = (
        "`tests/engine/test_scale.py::test_locks` `tests/engine/test_scale.py` "
        "`tests/test_scale.py` `tests/engine/test_scale.py::test_gone`"
    )
    assert missing_test_refs(text, tmp_path) == [
        "tests/engine/test_scale.py::test_gone",
        "tests/test_scale.py",
    ]


def test_importing_the_folder_name_is_refused_with_the_import_name():
    """The troubleshooting row for `import pipeline` (the folder name, not the package)."""
    out = subprocess.run(
        [sys.executable, "-c", "import pipeline"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "imported as 'mlx_interp', not 'pipeline'" in out.stderr
