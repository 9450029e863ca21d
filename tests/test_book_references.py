"""The book's citations, cross-references and published numbers, checked against independent references.

Nothing here executes a chapter: the notebooks are read as JSON. The published numbers are transcribed
from the papers' tables (and, for DLRT, from the authors' repository), independently of the chapters.
"""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(p.stem for p in BOOK.glob("*.ipynb"))
PAGES = sorted(p.stem for p in BOOK.glob("*.md"))


def cells(chapter):
    return json.loads((BOOK / f"{chapter}.ipynb").read_text())["cells"]


def texts():
    """(page, cell index, source) of every notebook cell and every Markdown page."""
    for chapter in CHAPTERS:
        for i, cell in enumerate(cells(chapter)):
            yield chapter, i, "".join(cell["source"])
    for page in PAGES:
        yield page, 0, (BOOK / f"{page}.md").read_text()


def bib_entries():
    """``{key: {field: value}}`` of book/references.bib (one level of braces inside a value)."""
    text = (BOOK / "references.bib").read_text()
    entries = {}
    for m in re.finditer(r"@(\w+)\{([^,\s]+),(.*?)\n\}", text, re.S):
        fields = {f.lower(): v for f, v in re.findall(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", m.group(3))}
        fields["type"] = m.group(1).lower()
        assert m.group(2) not in entries, f"duplicate bib key {m.group(2)}"
        entries[m.group(2)] = fields
    return entries


def cited_keys():
    keys = {}
    for page, i, text in texts():
        for m in re.finditer(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            for key in m.group(1).split(","):
                keys.setdefault(key.strip(), []).append((page, i))
    return keys


def test_every_cited_key_is_in_the_bibliography():
    """Every {cite}/{cite:t} key of a chapter or page resolves in references.bib (sphinxcontrib-bibtex)."""
    entries = bib_entries()
    missing = {k: where for k, where in cited_keys().items() if k not in entries}
    assert not missing, missing


def test_every_bibliography_entry_is_cited():
    """bibliography.md lists only cited entries: an uncited entry is dead weight (or a lost citation)."""
    assert not set(bib_entries()) - set(cited_keys())


def test_doc_and_ref_targets_exist():
    """{doc}`x` names a page of the book; {ref}`label` a label that a page defines with ``(label)=``."""
    pages = set(CHAPTERS) | set(PAGES)
    labels = {m for _, _, text in texts() for m in re.findall(r"^\(([\w-]+)\)=", text, re.M)}
    bad = []
    for page, i, text in texts():
        for role, target in re.findall(r"\{(doc|ref)\}`([^`]+)`", text):
            target = target.split("<")[-1].rstrip(">")
            if target not in (pages if role == "doc" else labels):
                bad.append((page, i, role, target))
    assert not bad, bad


# (first author's surname, year, a word of the venue), from the papers' own title pages.
MAIN_PAPERS = {
    "frankle2019lottery": ("Frankle", "2019", "Learning Representations"),
    "lee2019snip": ("Lee", "2019", "Learning Representations"),
    "evci2020rigging": ("Evci", "2020", "Machine Learning"),
    "finn2017model": ("Finn", "2017", "Machine Learning"),
    "snell2017prototypical": ("Snell", "2017", "Neural Information Processing"),
    "schwarz2021powerpropagation": ("Schwarz", "2021", "Neural Information Processing"),
    "jayakumar2020topkast": ("Jayakumar", "2020", "Neural Information Processing"),
    "schotthofer2022lowrank": ("Schotth", "2022", "Neural Information Processing"),
    "mallya2018packnet": ("Mallya", "2018", "Computer Vision and Pattern Recognition"),
    "zhu2017prune": ("Zhu", "2017", "arXiv"),
    "mocanu2018scalable": ("Mocanu", "2018", "Nature Communications"),
    "dettmers2019sparse": ("Dettmers", "2019", "arXiv"),
    "you2020drawing": ("You", "2020", "Learning Representations"),
    "frankle2020linear": ("Frankle", "2020", "Machine Learning"),
    "andrychowicz2016learning": ("Andrychowicz", "2016", "Neural Information Processing"),
    "nichol2018first": ("Nichol", "2018", "arXiv"),
    "li2017metasgd": ("Li", "2017", "arXiv"),
    "raghu2020rapid": ("Raghu", "2020", "Learning Representations"),
    "vinyals2016matching": ("Vinyals", "2016", "Neural Information Processing"),
    "garnelo2018conditional": ("Garnelo", "2018", "Machine Learning"),
    "evci2022gradmax": ("Evci", "2022", "Learning Representations"),
}


@pytest.mark.parametrize("key", sorted(MAIN_PAPERS))
def test_main_papers_have_the_published_first_author_year_and_venue(key):
    """The bib entries of the course's main papers match their title pages (author, year, venue)."""
    author, year, venue = MAIN_PAPERS[key]
    entry = bib_entries()[key]
    assert entry["author"].startswith(author), entry["author"]
    assert entry["year"] == year, entry["year"]
    assert venue in entry.get("booktitle", entry.get("journal", "")), entry


def assigned_literal(chapter, name):
    """The literal value of the top-level assignment ``name = ...`` in a chapter's code cells."""
    for cell in cells(chapter):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if not re.search(rf"^{name}\s*=", source, re.M):
            continue
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return ast.literal_eval(node.value)
    raise LookupError(f"{chapter}: no {name} = <literal>")


def test_omniglot_published_numbers_match_the_papers():
    """MAML (Finn et al. 2017, Table 1), first-order MAML and Reptile with transduction (Nichol et al. 2018, the
    final arXiv version's Omniglot table), Meta-SGD (Li et al. 2017, its Omniglot table), ANIL (Raghu et al. 2020,
    Table 2), ProtoNets (Snell et al. 2017, Table 1) and matching networks (Vinyals et al. 2016, as Snell et al.'s
    and Finn et al.'s Table 1 quote them): Omniglot 5w1s, 5w5s, 20w1s, 20w5s (%)."""
    papers = {
        "MAML": (98.7, 99.9, 95.8, 98.9),
        "FOMAML": (98.3, 99.2, 89.4, 97.9),
        "Reptile": (97.68, 99.48, 89.43, 97.12),
        "Meta-SGD": (99.53, 99.93, 95.93, 98.97),
        "ANIL": (None, None, 96.2, 98.0),
        "ProtoNet": (98.8, 99.7, 96.0, 98.9),
        "Matching network": (98.1, 98.9, 93.8, 98.5),
    }
    optimisation = assigned_literal("optimisation_based", "PUBLISHED")
    for method in ("MAML", "FOMAML", "Reptile", "Meta-SGD", "ANIL"):
        assert tuple(optimisation[method]) == papers[method], method
    black_box = assigned_literal("black_box", "PUBLISHED")
    for method in ("ProtoNet", "MAML", "Matching network"):
        assert tuple(black_box[method][0]) == papers[method], method


def test_rigl_published_numbers_match_the_paper_and_the_authors_readme():
    """RigL's ResNet-50 (uniform, 1x training): dense 76.8, static 70.6 / 65.8 and RigL 74.6 / 72.0 at 80 / 90%
    sparsity (Evci et al. 2020, Figure 2, left; RigL's 74.60 and 72.02 also in the '1x Training Results' of the
    authors' README, github.com/google-research/rigl), static 59.5 and RigL 67.5 at 95% (appendix L, Table 4)."""
    published = assigned_literal("dynamic_sparse_training", "PUBLISHED")
    assert published["dense"] == {0.0: 76.8}
    assert published["static"] == {0.8: 70.6, 0.9: 65.8, 0.95: 59.5}
    assert published["RigL"] == {0.8: 74.6, 0.9: 72.0, 0.95: 67.5}


def test_dlrt_published_table_matches_the_authors_repository():
    """Lenet_experiment/cross_val_tab_paper.csv of github.com/COMPiLELab/DLRT-Net (theta, mean test accuracy,
    ranks, params test, c.r. test, params train, c.r. train), transcribed by hand."""
    csv = {
        None: (98.819, None, 430500, 0.0, 861000, 0.0),
        0.09: (98.161, (10, 23, 62), 37445, 91.3, 532176, 38.2),
        0.11: (98.212, (10, 20, 48), 30278, 93.0, 412898, 52.0),
        0.13: (97.872, (9, 16, 37), 24542, 94.3, 316997, 63.2),
        0.15: (98.139, (9, 16, 28), 20033, 95.3, 251477, 70.8),
        0.2: (98.115, (8, 8, 15), 13091, 97.0, 135536, 84.3),
        0.3: (97.451, (4, 6, 8), 9398, 97.8, 80792, 90.6),
        0.4: (95.967, (2, 4, 4), 7250, 98.3, 47882, 94.4),
        0.45: (94.068, (2, 2, 3), 6647, 98.5, 35654, 95.9),
    }
    assert assigned_literal("low_rank", "PUBLISHED") == csv


def test_snip_and_maml_sinusoid_numbers_in_the_code_match_the_prose():
    """The published numbers the code prints are the ones the chapter's Markdown quotes: SNIP's LeNet-300-100
    errors (Lee et al. 2019, Table 1: 1.7 dense, 1.6 at 95%, 2.4 at 98%) and MAML's 5-shot sinusoid MSE."""
    pruning = "\n".join("".join(c["source"]) for c in cells("pruning"))
    for row in ("| dense | 1.7% |", "| SNIP, 95% sparse | 1.6% |", "| SNIP, 98% sparse | 2.4% |"):
        assert row in pruning, row
    assert 'published = {0.95: "1.6%", 0.98: "2.4%"}' in pruning
    meta = "\n".join("".join(c["source"]) for c in cells("meta_learning"))
    assert 'published = {"MAML": (0.67, 0.38, 0.35), "pre-trained": (2.41, 2.23, 2.19)}' in meta
    assert "published 0.67, 0.38 and 0.35" in meta and "published 2.41, 2.23 and 2.19" in meta
