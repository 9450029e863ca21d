"""The book's chapters and configuration agree with each other and with the library."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def toc_files(node):
    if isinstance(node, dict):
        files = [node["file"]] if "file" in node else []
        files += [node["root"]] if "root" in node else []
        return files + [f for value in node.values() for f in toc_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in toc_files(item)]
    return []


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_toc_lists_exactly_the_chapters_that_exist():
    listed = set(toc_files(TOC))
    for entry in listed:
        assert any((ROOT / entry).with_suffix(s).exists() for s in (".md", ".ipynb")), entry
    for chapter in CHAPTERS:
        assert str(chapter.relative_to(ROOT).with_suffix("")) in listed, f"{chapter.name} is not in _toc.yml"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_installs_lowlearn_from_the_configured_repository_on_colab_only(chapter):
    first = "".join(code_cells(chapter)[0]["source"])
    assert 'if "google.colab" in sys.modules:' in first
    assert f'"lowlearn @ git+{CONFIG["repository"]["url"]}"' in first


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapter_is_committed_with_outputs_and_prints_its_profile(chapter):
    cells = code_cells(chapter)
    assert all(c.get("outputs") or i == 0 for i, c in enumerate(cells[:3])), "run the chapter before committing"
    text = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    assert "profile: " in text and "device: " in text, "print lowlearn.profiles.banner() first"


def test_failing_cells_fail_the_build():
    assert CONFIG["execute"]["execute_notebooks"] == "force"
    assert CONFIG["sphinx"]["config"]["nb_execution_raise_on_error"] is True
