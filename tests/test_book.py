"""The book's chapters and configuration agree with each other and with the library."""

import ast
import builtins
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
    assert len(CHAPTERS) > 10, CHAPTERS                  # the parametrized tests below check each of them
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


def unshown_widgets(notebook):
    """Cells whose widget output has no saved state: the rendered page, which has no kernel, shows nothing there."""
    state = notebook["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    models = state.get("state", {})
    views = [(i, output["data"]["application/vnd.jupyter.widget-view+json"]["model_id"])
             for i, cell in enumerate(notebook["cells"]) for output in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    return [i for i, model in views if model not in models]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_widget_is_saved_with_its_state(chapter):
    assert unshown_widgets(json.loads(chapter.read_text())) == [], \
        "run the chapter and save the notebook with its widget state (nbclient's store_widget_state)"


def test_unshown_widgets_finds_a_widget_without_state():
    view = {"data": {"application/vnd.jupyter.widget-view+json": {"model_id": "a"}}}
    cells = [{"outputs": [{"text": "no widget"}]}, {"outputs": [view]}]
    assert unshown_widgets({"metadata": {}, "cells": cells}) == [1]
    saved = {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {"a": {}}}}}
    assert unshown_widgets({"metadata": saved, "cells": cells}) == []


def unbound_names(chapter):
    """``{name: line}`` of the names a chapter's code reads but never binds (an import, an assignment, a def, ...).

    Each cell is parsed on its own, with IPython's magic and shell lines as ``pass``.
    The order of the cells is not followed: this finds a name that is missing, not one
    used before it is defined.
    """
    def plain(line):
        stripped = line.lstrip()
        return line[: len(line) - len(stripped)] + "pass" if stripped.startswith(("%", "!")) else line

    bound, read = set(dir(builtins)) | {"display", "get_ipython"}, {}   # IPython's own names too
    for cell in code_cells(chapter):
        for node in ast.walk(ast.parse("\n".join(map(plain, "".join(cell["source"]).splitlines())))):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    read.setdefault(node.id, node.lineno)
                else:
                    bound.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
                bound.add(node.name)
    return {name: line for name, line in read.items() if name not in bound}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_every_name_a_chapter_reads_is_defined_in_it(chapter):
    # The smoke test executes only the cells of the smoke profile: the gpu profile's sections (CIFAR-10,
    # full MNIST) would otherwise first fail on a reader's GPU, after their training runs.
    assert unbound_names(chapter) == {}


def test_unbound_names_finds_a_name_no_cell_defines(tmp_path):
    cells = [{"cell_type": "code", "source": ["import numpy as np\n", "%matplotlib inline\n", "if True:\n",
                                               "    !ls\n", "def f(a, *, b=1):\n", "    return np.sum(a) + b\n"]},
             {"cell_type": "code", "source": ["try:\n", "    f(x)\n", "except ValueError as error:\n",
                                               "    print(error, density_axis(f))\n"]}]
    chapter = tmp_path / "chapter.ipynb"
    chapter.write_text(json.dumps({"cells": cells}))
    assert set(unbound_names(chapter)) == {"x", "density_axis"}


def test_failing_cells_fail_the_build():
    assert CONFIG["execute"]["execute_notebooks"] == "force"
    assert CONFIG["sphinx"]["config"]["nb_execution_raise_on_error"] is True
