"""A cache is data from someone else: reading, inspecting or verifying one never runs code named by the file, and
every damaged file is one line that names it, exit code 2."""

import json
import re
import shutil

import h5py
import pytest
from s3helpers import build, overrides

from flows import cli
from kd_core import io
from kd_core.build import validate
from kd_core.dataset import CacheDataset
from kd_core.errors import CacheFileError
from kd_core.store import resolve

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
    build(validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 10},
                                              run={"num_shards": 1})))
    with h5py.File(resolve(str(out)).index_uri, "r+") as f:
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


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, small_teacher_dir, corpus_path):
    out = tmp_path_factory.mktemp("clean") / "out"
    build(validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 20},
                                              run={"num_shards": 2, "part_samples": 10})))
    return out


def _damage(out, how):
    """Damage a copy of a cache the way `how` says; the file that is now wrong."""
    key = io.read_json(str(out / "latest.json"))["version"]
    part = sorted((out / "versions" / key / "parts").rglob("*.h5"))[-1]
    if how == "garbage latest.json":
        (out / "latest.json").write_text("{not json")
        return out / "latest.json"
    data = part.read_bytes()
    if how == "truncated part":
        part.write_bytes(data[: len(data) // 2])
    else:  # same size, 64 bytes flipped in the middle of the data
        at = int(len(data) * 0.6)
        part.write_bytes(data[:at] + bytes(b ^ 0xFF for b in data[at:at + 64]) + data[at + 64:])
    return part


@pytest.mark.parametrize("how", ["truncated part", "garbage latest.json", "bit flips in a part"])
def test_every_damaged_cache_is_one_line_naming_the_file_with_exit_2(how, clean_cache, tmp_path, capsys):
    """Damaged caches once gave bare OSError/JSONDecodeError tracebacks (exit 1) or, bit-flipped, exit 0."""
    out = tmp_path / "out"
    shutil.copytree(clean_cache, out)
    damaged = _damage(out, how)
    commands = [["inspect", str(out), "--deep"]]
    if how != "bit flips in a part":  # only the checksums see flipped bits in compressed chunks for sure
        commands += [["inspect", str(out)], ["verify", str(out), "--samples", "20"]]
    for argv in commands:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and str(damaged) in err, (argv, err)
    if how != "bit flips in a part":
        with pytest.raises(CacheFileError, match=re.escape(str(damaged))):
            dataset = CacheDataset(str(out))
            [dataset[i] for i in range(len(dataset))]


def test_inspect_deep_passes_an_intact_cache(clean_cache, capsys):
    assert cli.main(["inspect", str(clean_cache), "--deep"]) == 0


class _Evil:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('the pickle ran')",))


def test_verify_with_teacher_weights_that_are_a_malicious_pickle_is_one_line_and_runs_nothing(
        crafted_cache, small_teacher_dir, tmp_path, capsys):
    """A teacher whose weights are a pickle (pytorch_model.bin) that runs code when loaded: transformers refuses
    it (weights_only), which was a traceback; now one line naming teacher.model, exit 2, and nothing ran."""
    import pickle

    out, _, _ = crafted_cache
    evil = tmp_path / "pickled-teacher"
    shutil.copytree(small_teacher_dir, evil)
    for weights in evil.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "ran.txt"
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(marker)))
    assert cli.main(["verify", str(out), "--teacher", str(evil), "--samples", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "verify ran the pickle's code"
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "teacher.model" in err, err
