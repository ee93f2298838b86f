"""vae/sample.py (`python -m vae.sample`): the six files from a checkpoint or an export, seeded, written where asked;
bad settings refused in one line before anything is written."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from omegaconf import OmegaConf

from support import run_script
from vae.sample import SampleConfig, sample

FILES = sorted(f"{name}.{ext}" for name in ("prior", "reconstructions", "interpolation") for ext in ("png", "npy"))


def run_sample(**settings):
    return sample(OmegaConf.merge(OmegaConf.structured(SampleConfig), settings))


def arrays(out) -> dict:
    return {name: np.load(out / f"{name}.npy") for name in ("prior", "reconstructions", "interpolation")}


def test_the_command_writes_six_files(tiny_checkpoint, tmp_path):
    out = tmp_path / "pictures"
    proc = run_script([f"checkpoint={tiny_checkpoint}", f"out={out}", "n=12", "recon=5", "pair=[2,7]", "steps=6"],
                      script="vae.sample")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 6 files to {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == FILES
    a = arrays(out)
    assert a["prior"].shape == (12, 28, 28) and a["prior"].dtype == np.float32
    assert a["reconstructions"].shape == (10, 28, 28)  # the 5 test images above their 5 reconstructions
    assert a["interpolation"].shape == (6, 28, 28)
    assert all(0 <= v.min() and v.max() <= 1 for v in a.values())


def test_seeded_and_reproducible(tiny_checkpoint, tmp_path):
    run_sample(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "a"), n=16)
    run_sample(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "b"), n=16)
    run_sample(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "c"), n=16, seed=1)
    a, b, c = (arrays(tmp_path / d) for d in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "prior.png").read_bytes() == (tmp_path / "b" / "prior.png").read_bytes()
    assert not np.array_equal(a["prior"], c["prior"])  # the seed draws the prior samples...
    assert np.array_equal(a["reconstructions"], c["reconstructions"])  # ...and nothing else is random


def test_default_out_is_beside_the_checkpoint_and_an_export_is_read_alike(tiny_checkpoint, tmp_path):
    from vae.api import load

    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    run_sample(checkpoint=str(ckpt), n=8)
    assert sorted(p.name for p in (tmp_path / "best.samples").iterdir()) == FILES
    export = load(ckpt).export(tmp_path / "model.pt")
    run_sample(checkpoint=str(export), n=8)
    a, b = arrays(tmp_path / "best.samples"), arrays(tmp_path / "model.samples")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, needle", [
    ("n=0", "n=0 is not allowed"),
    ("pair=[0]", "pair=[0] is not allowed: two test image indices"),
    ("steps=1", "steps=1 is not allowed"),
    ("recon=2000", "recon=2000 is not allowed"),
])
def test_bad_settings_are_one_line(tiny_checkpoint, tmp_path, override, needle):
    out = tmp_path / "out"
    proc = run_script([f"checkpoint={tiny_checkpoint}", f"out={out}", override], script="vae.sample")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {needle}"), proc.stderr
    assert not out.exists()


def test_a_missing_checkpoint_is_named(tmp_path):
    for args, needle in (([f"checkpoint={tmp_path / 'nope.pt'}"], f"checkpoint='{tmp_path / 'nope.pt'}': no such file"),
                         ([], "checkpoint= is required")):
        proc = run_script(args, script="vae.sample")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr


def test_pair_beyond_the_test_set_and_out_on_a_file_are_refused(tiny_checkpoint, tmp_path):
    from vae.common.errors import UserError

    with pytest.raises(UserError, match=r"pair=\[0, 100\]: the test set has only 100 images; choose indices from 0 "
                                        r"to 99"):
        run_sample(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "out"), pair=[0, 100])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not writable"):
        run_sample(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "file"))
