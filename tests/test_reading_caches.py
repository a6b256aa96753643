"""A cache is data from someone else: reading, inspecting or verifying one never runs code named by the file."""

import json
import shutil

import h5py
import pytest
from s3helpers import build, overrides

from flows import cli
from kd_core import pipeline

EVIL = '''
import pathlib
pathlib.Path(MARKER).write_text("the cache ran this code")
from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel  # noqa: F401
'''


@pytest.fixture(scope="module")
def crafted_cache(tmp_path_factory, small_teacher_dir, corpus_path):
    """A real cache whose attributes were edited to name a teacher that carries its own code, with
    trust_remote_code=true in the recorded config; the code writes a marker file when imported."""
    root = tmp_path_factory.mktemp("crafted")
    teacher = root / "evil-teacher"
    shutil.copytree(small_teacher_dir, teacher)
    marker = root / "ran.txt"
    (teacher / "evil.py").write_text(f"MARKER = {str(marker)!r}\n" + EVIL)
    config = json.loads((teacher / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (teacher / "config.json").write_text(json.dumps(config))

    out = root / "out"
    build(pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 10},
                                              run={"num_shards": 1})))
    with h5py.File(pipeline.resolve_cache_uri(str(out)), "r+") as f:
        recorded = json.loads(f.attrs["config"])
        recorded["teacher"].update(model=str(teacher), trust_remote_code=True)
        f.attrs["config"] = json.dumps(recorded)
        f.attrs["teacher_model"] = str(teacher)
    return out, teacher, marker


def test_verify_of_a_crafted_cache_runs_no_code_and_names_the_teacher_first(crafted_cache, capsys):
    """verify once took teacher.model and trust_remote_code from the cache's attributes and ran its code."""
    out, teacher, marker = crafted_cache
    cli.main(["verify", str(out), "--samples", "2"])
    printed = capsys.readouterr().out
    assert not marker.exists(), "verify ran code named by the cache"
    first = printed.splitlines()[0]
    assert first.startswith(f"loading teacher {teacher} @ default revision (named by the cache")
    assert first.endswith("trust_remote_code=False")


@pytest.mark.parametrize("samples", ["0", "-1", "two"])
def test_verify_samples_must_be_positive(crafted_cache, samples, capsys):
    """--samples 0 once said OK having checked nothing, and -1 raised a traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", str(crafted_cache[0]), "--samples", samples])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --samples: must be a whole number of samples, at least 1" in err
    assert "Traceback" not in err
