"""The project is citable: a license, a CITATION.cff that citation tools read, and a reference list that names the
paper of every estimator the code offers."""
from __future__ import annotations

import datetime
import re

import yaml

from support import REPO
from vae.estimators import ESTIMATORS

# What the Citation File Format 1.2.0 schema requires of every file (https://citation-file-format.github.io/).
CFF_REQUIRED = ("cff-version", "message", "title", "authors")


def citation() -> dict:
    return yaml.safe_load((REPO / "CITATION.cff").read_text())


def test_citation_cff_parses_with_the_keys_citation_tools_require():
    cff = citation()
    assert [k for k in CFF_REQUIRED if k not in cff] == []
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == "gumbel-vae"
    assert cff["license"] == "MIT"
    assert isinstance(cff["authors"], list) and cff["authors"]
    for author in cff["authors"]:  # a person has family-names, an entity a name
        assert "name" in author or "family-names" in author, author
    datetime.date.fromisoformat(str(cff["date-released"]))
    for ref in cff.get("references", []):
        assert {"type", "title", "authors"} <= set(ref), ref


def test_citation_version_is_the_package_version():
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert str(citation()["version"]) == version


def test_license_is_mit_and_matches_the_citation():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert citation()["authors"][0]["name"] in text


def test_every_estimator_has_its_paper_in_the_references():
    text = (REPO / "docs" / "references.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)`.*$", text, flags=re.M)}
    assert [name for name in list(ESTIMATORS) if name not in rows] == []
    for name in list(ESTIMATORS):
        if name != "exact":  # exact is plain enumeration: no paper to cite
            assert re.search(r"\]\(#\w+\)", rows[name]), f"{name}: no link to a reference"


def test_reference_links_point_at_entries_and_every_entry_has_a_link():
    text = (REPO / "docs" / "references.md").read_text()
    anchors = set(re.findall(r'<a id="(\w+)"></a>', text))
    assert set(re.findall(r"\]\(#(\w+)\)", text)) <= anchors
    entries = [line for line in re.split(r"\n(?=- <a id=)", text) if line.startswith("- <a id=")]
    assert len(entries) == len(anchors) >= 15
    for entry in entries:
        assert re.search(r"\(\d{4}\)", entry), entry[:80]  # a year
        assert re.search(r"\]\(https://", entry), entry[:80]  # a link


def test_readme_links_the_references_and_says_how_to_cite():
    text = (REPO / "README.md").read_text()
    assert "docs/references.md" in text and "CITATION.cff" in text
