"""vae/export.py (`python -m vae.export`): a weights-only file beside the checkpoint or where asked, smaller and
the same model; the checkpoint itself, a folder or a missing file refused in one line."""
from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from support import run_script
from vae.export import ExportConfig, export


def run_export(**settings):
    return export(OmegaConf.merge(OmegaConf.structured(ExportConfig), settings))


def test_the_command_writes_a_smaller_file_beside_the_checkpoint(tiny_checkpoint, tmp_path):
    from vae.api import load

    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    proc = run_script([f"checkpoint={ckpt}"], script="vae.export")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "best.export.pt"
    assert proc.stdout.startswith(f"wrote {out} (")
    assert out.stat().st_size < ckpt.stat().st_size / 2
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "gumbel-vae-export/1" and "optimizer" not in saved and "rng" not in saved
    x = load(ckpt).test_images(10)
    assert torch.equal(load(out).encode(x), load(ckpt).encode(x))


def test_out_names_the_file(tiny_checkpoint, tmp_path):
    written = run_export(checkpoint=str(tiny_checkpoint), out=str(tmp_path / "models" / "glyphs.pt"))
    assert written == tmp_path / "models" / "glyphs.pt" and written.is_file()


@pytest.mark.parametrize("out, needle", [
    ("{ckpt}", "is the checkpoint itself"),
    ("{dir}", "is a directory; name the file to write"),
])
def test_bad_outs_are_one_line(tiny_checkpoint, tmp_path, out, needle):
    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    before = ckpt.read_bytes()
    proc = run_script([f"checkpoint={ckpt}", "out=" + out.format(ckpt=ckpt, dir=tmp_path)], script="vae.export")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_a_missing_or_foreign_checkpoint_is_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for args, needle in (([f"checkpoint={tmp_path / 'nope.pt'}"], f"checkpoint='{tmp_path / 'nope.pt'}': no such file"),
                         ([f"checkpoint={tmp_path / 'junk.pt'}"], "is not a gumbel-vae checkpoint"),
                         ([], "checkpoint= is required")):
        proc = run_script(args, script="vae.export")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr, proc.stderr
