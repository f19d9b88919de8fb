"""The README and the docs site without mkdocs: every relative link resolves (anchors included), no page of the site
links out of docs/, every page is in mkdocs.yml's nav and every nav entry exists, and every object an API page
documents (`::: trl_trm.x.Y`, `members:`) is defined in, or imported into, its module (read with `ast`, nothing
imported). `make docs-build` (CI) runs the real `mkdocs build --strict`; this file catches the same breakages in the
fast suite, where mkdocs is not installed."""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans: a link shown as code is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's `toc` extension (mkdocs) gives a heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading anchors on its text
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def _relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("//")


def _broken(page: Path) -> list[str]:
    broken = []
    for target in _links(page):
        if not _relative(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading gives #{anchor}")
    return broken


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not _broken(page), f"{page.relative_to(ROOT)}: broken links {_broken(page)}"


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](a.md) [ok](a.md#a-section) [web](https://example.org/x.md) `[code](nope.md)`\n"
        "```\n[fenced](nope.md)\n```\n[missing](nope.md) [bad anchor](a.md#nope) ![img](img/none.png)\n"
    )
    assert _broken(page) == [
        "nope.md: no such file",
        "a.md#nope: no heading gives #nope",
        "img/none.png: no such file",
    ]


def test_the_readme_links_to_the_docs_and_every_docs_link_stays_in_docs():
    targets = [t for t in _links(README) if _relative(t)]
    assert any(t.startswith("docs/") for t in targets), "the README links no docs page"
    for page in PAGES:  # mkdocs serves docs/ only: a link out of it is broken on the site
        for target in filter(_relative, _links(page)):
            dest = (page.parent / target.partition("#")[0]).resolve()
            assert dest.is_relative_to(DOCS.resolve()), f"{page.relative_to(ROOT)} links out of docs/: {target}"


def test_the_readme_is_a_landing_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, "README.md is over 150 lines: move the detail to a page under docs/"
    setup = re.search(r"^## Quick start.*?```bash\n(.*?)```", text, re.M | re.S)
    assert setup, "the README has no Quick start block"
    commands = [line.split("#")[0].strip() for line in setup.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]  # the two set-up commands; CI (.ci/run) calls `make test`


# ------------------------------------------------------------------------------------------------- mkdocs.yml
class _Loader(yaml.SafeLoader):
    """mkdocs.yml names Python objects (`!!python/name:...`, the mermaid fence): read them as strings."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav] if nav.endswith(".md") else []
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def test_mkdocs_nav_lists_every_page_and_only_pages_that_exist():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)
    assert config["strict"] is True and config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in PAGES}
    assert sorted(set(nav) - pages) == [], "nav entries without a page"
    assert sorted(pages - set(nav)) == [], "pages missing from the nav"
    assert len(nav) == len(set(nav)), "a page is listed twice"


# ------------------------------------------------------------------------------------------------- API pages
def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _resolves(identifier: str) -> bool:
    """`identifier` is a module of this repository, or a name defined in or imported into one."""
    if _module_file(identifier):
        return True
    module, _, name = identifier.rpartition(".")
    path = _module_file(module)
    return path is not None and name in _top_level_names(path)


API_PAGES = sorted((DOCS / "api").glob("*.md"))


@pytest.mark.parametrize("page", API_PAGES, ids=lambda p: p.name)
def test_every_api_object_exists(page):
    text = page.read_text(encoding="utf-8")
    identifiers = re.findall(r"^::: *([\w.]+)", text, re.M)
    assert identifiers, f"{page.name} documents nothing"
    for identifier in identifiers:
        assert _resolves(identifier), f"{page.name}: {identifier} is not in the code"
    for block in re.finditer(r"^::: *([\w.]+)\n((?:[ \t]+.*\n?)*)", text, re.M):
        options = yaml.safe_load(block.group(2)) or {}
        for member in (options.get("options") or {}).get("members") or []:
            assert _resolves(f"{block.group(1)}.{member}"), (
                f"{page.name}: {block.group(1)}.{member} is not in the code"
            )


def test_the_api_reference_covers_the_public_modules():
    documented = {re.findall(r"^::: *trl_trm\.(\w+)", p.read_text(encoding="utf-8"), re.M)[0] for p in API_PAGES}
    wanted = {"trainer", "config", "masking", "bounds", "adaptive", "callbacks", "rollout", "processors", "hub"}
    assert wanted <= documented, f"no API page for {sorted(wanted - documented)}"
