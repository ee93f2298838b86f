"""The docs' promises. docs/data.md: the copy-paste example of "Your own data" runs as printed (its array and its
folder variant, cut to one epoch), and the table of validation-split defaults is what the configs say.
docs/estimators.md and the README: the tables of a published study are its numbers."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support import REPO, compose_train, subprocess_env

DOC = REPO / "docs" / "data.md"


def own_data_blocks() -> list:
    """The bash blocks of the section "Your own data", in order."""
    text = DOC.read_text()
    section = text[text.index("## Your own data"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def run_block(block: str, cwd) -> subprocess.CompletedProcess:
    """One block as a user runs it from the repository, but in `cwd` (its files land there) and for one epoch."""
    assert "epochs=30" in block
    script = (block.replace("epochs=30", "epochs=1")
              .replace("python train.py", f"{sys.executable} {REPO / 'train.py'}")
              .replace("python -", f"{sys.executable} -"))
    return subprocess.run(["bash", "-euc", script], cwd=cwd, env=subprocess_env(PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)


def test_the_own_data_example_runs_as_printed(tmp_path):
    blocks = own_data_blocks()
    assert len(blocks) == 2  # the array example, then the folder variant
    proc = run_block(blocks[0], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "outputs" / "discs"
    assert "discs: 1620 train, 180 validation, 200 test images of 32x32" in (run / "train.log").read_text()
    samples = run / "checkpoints" / "best.samples"
    assert sorted(p.name for p in samples.iterdir()) == sorted(
        f"{name}.{ext}" for name in ("prior", "reconstructions", "interpolation") for ext in ("png", "npy"))

    proc = run_block(blocks[1], tmp_path)  # the folder variant reads the array the first block wrote
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "discs" / "test").glob("*.png"))) == 200
    log = (tmp_path / "outputs" / "discs-png" / "train.log").read_text()
    assert "discs-png: 1620 train, 180 validation, 200 test images of 32x32" in log


@pytest.mark.parametrize("overrides, val_size", [
    ([], 5000), (["data=fashion_mnist"], 5000), (["data=array", "data.path=x.npy"], 0.1),
    (["data=folder", "data.path=x"], 0.1), (["experiment=paper"], 0), (["experiment=reinmax"], 0),
    (["debug=tiny"], 0),
])
def test_validation_defaults_are_the_documented_ones(overrides, val_size):
    assert compose_train(*overrides).data.val_size == val_size
    assert "`data.val_size`" in DOC.read_text()


def test_the_docs_tables_of_a_published_study_are_its_numbers():
    """docs/estimators.md and the README quote docs/results/<study>/results.json, mean ± std and n as the study's
    own table prints them (vae.study.tables), row for row."""
    import json

    from vae.study import tables

    docs = (REPO / "docs" / "estimators.md").read_text()
    readme = (REPO / "README.md").read_text()
    studies = sorted((REPO / "docs" / "results").glob("*/results.json"))
    assert studies
    for path in studies:
        rows = json.loads(path.read_text())["rows"]
        printed = tables(rows)
        assert (path.parent / "results.md").read_text().strip() == printed.strip()
        for line in (ln for ln in printed.splitlines() if ln.startswith("| `")):
            assert line in docs, line
        for row in rows:  # every finished row's mean is quoted in the README too
            if row.get("test_elbo_discrete"):
                assert f"{row['test_elbo_discrete']['mean']:.2f}" in readme, row["estimator"]
