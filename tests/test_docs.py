"""The documentation site: it builds offline with --strict (and that build fails on a broken link), and its argument
table is the table of terms the CLI prints."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

MKDOCS = Path(sys.executable).with_name("mkdocs")
pytestmark = pytest.mark.skipif(not MKDOCS.exists(), reason="mkdocs is a dev dependency (make install)")


def build(root: Path, site: Path):
    return subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(site)], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_docs_build_strict_and_the_argument_table_is_the_table_of_terms(tmp_path):
    from yolo_fgd.cfg.distill import ARGS, TERM_TABLE

    out = build(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stderr[-3000:]
    page = (tmp_path / "site" / "arguments" / "index.html").read_text()
    for arg in ARGS:  # every distillation argument, in the generated table
        assert f"<code>{arg}</code>" in page, arg
    for term in TERM_TABLE:
        assert term["what"].split(":")[0] in page, term["name"]


def test_docs_build_fails_on_a_broken_link(tmp_path):
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "index.md").write_text((copy / "docs" / "index.md").read_text() + "\n[gone](nope.md)\n")
    out = build(copy, tmp_path / "site")
    assert out.returncode != 0 and "nope.md" in out.stderr, out.stderr[-2000:]


def test_readme_is_short_and_its_links_into_the_docs_exist():
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), target
