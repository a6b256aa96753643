"""Reading checks what it reads against the manifest, and never leaves the cache: every read path (CacheReader,
CacheDataset, StreamingCacheDataset, inspect, verify, export) refuses a damaged, foreign or crafted cache with one
line naming the file. Also the read commands' options and what they print (never a secret)."""

import contextlib
import io as io_module
import json
import logging
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from s3helpers import bucket, build, moto_endpoint, overrides  # noqa: F401

from flows import cli
from kd_core import io
from kd_core.build import validate
from kd_core.dataset import CacheDataset, StreamingCacheDataset
from kd_core.errors import CacheFileError, KDCacheError
from kd_core.h5cache import CacheReader
from kd_core.records import Manifest


def _one_line_exit_2(argv, capsys) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["export", "OUT.h5"]])
def test_a_password_in_the_uri_is_refused_without_echoing_it(command, tmp_path, capsys, monkeypatch):
    """`s3://user:pa/ss@bucket`: the userinfo pattern stopped at the '/', and the password was echoed."""
    monkeypatch.chdir(tmp_path)
    argv = [command[0], "s3://user:Zq9/pw0rd@bucket/kd", *command[1:]]
    err = _one_line_exit_2(argv, capsys)
    assert "credentials inside the URL" in err and "Zq9" not in err and "pw0rd" not in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, message", [
    ("endpointUrl=http://127.0.0.1:9", r"--storage-option endpointUrl: .*did you mean --storage-option endpoint_url\?"),
    ("client_kwargs.regionName=eu", r"--storage-option client_kwargs\.regionName: .*client_kwargs\.region_name\?"),
    ("secret=Zq9pw0rd", r"--storage-option secret: credentials are not accepted on the command line"),
    ("client_kwargs.aws_secret_access_key=Zq9pw0rd", r"credentials are not accepted on the command line"),
    ("endpoint_url=http://u:Zq9pw0rd@host", r"credentials are not accepted on the command line"),
    ("Zq9pw0rd", r"--storage-option: expected KEY=VALUE"),
])
def test_storage_options_of_the_read_commands_are_checked_before_anything_is_read(option, message, tmp_path,
                                                                                   capsys):
    for argv in (["inspect", str(tmp_path)], ["verify", str(tmp_path)], ["export", str(tmp_path), str(tmp_path / "o.h5")]):
        err = _one_line_exit_2([*argv, "--storage-option", option], capsys)
        assert re.search(message, err) and "Zq9" not in err, err


# ------------------------------------------------------------------------------------------------ built caches

@pytest.fixture(scope="module")
def clean(tmp_path_factory, small_teacher_dir, corpus_path):
    """A small top-k cache: 2 shards of 2 parts (10 samples a part)."""
    out = tmp_path_factory.mktemp("readcheck") / "out"
    build(validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 40},
                                              run={"num_shards": 2, "part_samples": 10})))
    return out


@pytest.fixture
def copy(clean, tmp_path):
    """A copy of the clean cache to damage; (output root, its version directory, its part files)."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    version = out / "versions" / io.read_json(str(out / "latest.json"))["version"]
    return out, version, sorted((version / "parts").rglob("*.h5"))


def test_a_hole_in_the_index_cannot_read_as_rows_to_stock_h5py(copy):
    """The index's virtual datasets read their fill value where a part is missing: it was 0, a valid id and a valid
    log-prob. Now NaN log-probs and logsumexp and an id no vocabulary has."""
    out, version, parts = copy
    parts[0].unlink()
    with h5py.File(version / "cache.h5", "r") as f:
        vocab = int(f.attrs["vocab_size"])
        hi = int(f["offsets"][1])  # sample 0 lives in the first part
        assert np.isnan(f["topk_logprobs"][:hi]).all() and np.isnan(f["logsumexp"][:hi]).all()
        assert (f["input_ids"][:hi] >= vocab).all() and (f["topk_indices"][:hi] >= vocab).all()


def _restamp(version, *files):
    """What a crafter does after editing files: the manifest's sizes and sha256 made to match them."""
    manifest = json.loads((version / "manifest.json").read_text())
    for entry in [*manifest["parts"], manifest["index"]]:
        path = version / entry["name"]
        if path in files:
            entry["bytes"], entry["sha256"] = path.stat().st_size, io.sha256_of(str(path))
    (version / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(version, edit):
    manifest = json.loads((version / "manifest.json").read_text())
    edit(manifest)
    (version / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_part(part, tmp_path, change):
    """The part file rebuilt with `change(file)` applied to a copy: every dataset copied, attributes kept."""
    crafted = tmp_path / "crafted.h5"
    with h5py.File(part, "r") as src, h5py.File(crafted, "w") as dst:
        for name, value in src.attrs.items():
            dst.attrs[name] = value
        for name in src:
            dst.create_dataset(name, data=src[name][:])
        change(dst, src)
    shutil.move(crafted, part)


@pytest.fixture(scope="module")
def other(tmp_path_factory, small_teacher_dir, corpus_path):
    """Another version with the same layout (same part names), made with other settings."""
    out = tmp_path_factory.mktemp("readcheck-other") / "out"
    build(validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 40},
                                              cache={"top_k": 4}, run={"num_shards": 2, "part_samples": 10})))
    return out


def _damage(how, copy, tmp_path, other):
    """Damage the copy as `how` says; a string the one-line error must contain."""
    out, version, parts = copy
    private = tmp_path / "private.bin"
    private.write_bytes(b"a private file outside the cache " * 1000)
    if how == "no manifest":
        (version / "manifest.json").unlink()
        return "manifest.json: is missing"
    if how == "damaged manifest":
        (version / "manifest.json").write_text('{"format_version": 1, "key": ')
        return "manifest.json: is damaged"
    if how == "manifest without parts":
        _edit_manifest(version, lambda m: m.update(parts=[]))
        return "manifest.json: lists no part files"
    if how == "missing part":
        parts[1].unlink()
        return f"{parts[1]}: missing"
    if how == "foreign part":
        key = io.read_json(str(other / "latest.json"))["version"]
        shutil.copy(other / "versions" / key / parts[1].relative_to(version), parts[1])
        return str(parts[1])
    if how in ("a name with ..", "an absolute name"):
        outside = tmp_path / "elsewhere" / "part.h5"
        outside.parent.mkdir()
        shutil.copy(parts[0], outside)
        name = "../../../elsewhere/part.h5" if how == "a name with .." else str(outside)
        _edit_manifest(version, lambda m: m["parts"][0].update(name=name))
        return "a file outside the version directory"
    if how == "external storage":
        def external(dst, src):
            del dst["logsumexp"]
            n = src["logsumexp"].shape[0]
            dst.create_dataset("logsumexp", shape=(n,), dtype="f4", external=[(str(private), 0, 4 * n)])
        _rewrite_part(parts[0], tmp_path, external)
        _restamp(version, parts[0])
        return "HDF5 external storage"
    if how == "external link":
        def link(dst, src):
            with h5py.File(tmp_path / "outside.h5", "w") as f:
                f["x"] = np.zeros(3)
            dst["stolen"] = h5py.ExternalLink(str(tmp_path / "outside.h5"), "/x")
        _rewrite_part(parts[0], tmp_path, link)
        _restamp(version, parts[0])
        return "external link"
    if how == "virtual source outside":
        with h5py.File(tmp_path / "outside.h5", "w") as f:
            f["x"] = np.zeros(3)
        with h5py.File(version / "cache.h5", "a") as f:
            layout = h5py.VirtualLayout(shape=(3,), dtype="f8")
            layout[:] = h5py.VirtualSource(str(tmp_path / "outside.h5"), "x", shape=(3,))
            f.create_virtual_dataset("stolen", layout)
        _restamp(version, version / "cache.h5")
        return "not a file of this cache"
    raise AssertionError(how)


DAMAGE = ["no manifest", "damaged manifest", "manifest without parts", "missing part", "foreign part",
          "a name with ..", "an absolute name", "external storage", "external link", "virtual source outside"]


@pytest.mark.parametrize("how", DAMAGE)
def test_every_read_path_refuses_what_the_manifest_does_not_vouch_for(how, copy, other, tmp_path, capsys):
    """No manifest, a damaged one, a missing or foreign part, names or HDF5 features that lead outside the version:
    one line naming the file, exit 2, from every read path; never zeros, never another file's bytes."""
    out, version, parts = copy
    needle = _damage(how, copy, tmp_path, other)
    for uri in (out, version, version / "cache.h5"):
        with pytest.raises(KDCacheError, match=re.escape(needle)):
            reader = CacheReader(str(uri))
            [reader[i] for i in range(len(reader))]
    with pytest.raises(KDCacheError, match=re.escape(needle)):
        dataset = CacheDataset(str(out))
        [dataset[i] for i in range(len(dataset))]
    with pytest.raises(KDCacheError, match=re.escape(needle)):
        list(StreamingCacheDataset(str(out)))
    exported = tmp_path / "exported.h5"
    for argv in (["inspect", str(out)], ["inspect", str(out), "--deep"], ["verify", str(out), "--samples", "40"],
                 ["export", str(out), str(exported)]):
        err = _one_line_exit_2(argv, capsys)
        assert needle in err, (argv, err)
    assert not exported.exists() and not list(tmp_path.glob("exported.h5*")) and not list(tmp_path.glob(".kd-export-*"))


@pytest.mark.parametrize("how", ["damaged manifest", "missing part"])
def test_the_command_line_refuses_damage_in_one_line_from_a_fresh_process(how, copy, other, tmp_path):
    """As a user runs it, with main()'s own logging on stderr: a damaged manifest once printed the store's
    "ignoring manifest.json: not a valid Manifest" warning above the refusal, and under pytest the handler main()
    left on a closed capture stream turned later tests' log lines into "--- Logging error ---" blocks."""
    out, _, _ = copy
    needle = _damage(how, copy, tmp_path, other)
    for command in ("inspect", "verify"):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", command, str(out)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"kd-cache {command}: ") and needle in line, line


def test_the_command_lines_log_follows_stderr_as_it_is_swapped():
    """main() sets up logging once per process; a caller that swaps stderr and closes the old one (pytest's capsys,
    a notebook's redirect) still gets its log lines, on the new stream."""
    logger = logging.getLogger("kd_cache.test.stderr")
    handler = cli.StderrHandler()
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stderr(io_module.StringIO()) as first:
            logger.warning("one")
        first.close()
        with contextlib.redirect_stderr(io_module.StringIO()) as second:
            logger.warning("two")
            assert second.getvalue() == "two\n"
    finally:
        logger.removeHandler(handler)


def test_export_checks_every_byte_refuses_its_own_inputs_and_exports_its_output(copy, tmp_path, capsys):
    """Export once accepted a bit-flipped part (exit 0), overwrote one of the cache's own parts when given it as
    OUT (exit 0), and failed with a traceback on an exported file."""
    out, version, parts = copy
    before = parts[0].read_bytes()
    err = _one_line_exit_2(["export", str(out), str(parts[0])], capsys)
    assert "is one of the files of the cache" in err and parts[0].read_bytes() == before
    once, twice = tmp_path / "once.h5", tmp_path / "twice.h5"
    assert cli.main(["export", str(out), str(once)]) == 0
    assert cli.main(["export", str(once), str(twice)]) == 0
    with CacheReader(str(out)) as a, CacheReader(str(once)) as b, CacheReader(str(twice)) as c:
        assert len(a) == len(b) == len(c) > 30
        for i in (0, 17, len(a) - 1):
            for name, value in a[i].items():
                assert np.array_equal(value, b[i][name]) and np.array_equal(value, c[i][name]), name
    assert cli.main(["inspect", str(twice), "--deep"]) == 0
    capsys.readouterr()
    data = bytearray(parts[1].read_bytes())  # 64 bytes flipped in the middle of the data, same size
    at = int(len(data) * 0.6)
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    parts[1].write_bytes(bytes(data))
    err = _one_line_exit_2(["export", str(out), str(tmp_path / "flipped.h5")], capsys)
    assert str(parts[1]) in err and "sha256" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["once.h5", "out", "twice.h5"]


def test_a_damaged_chunk_is_one_error_naming_the_file_from_every_reader(copy, capsys):
    """Same size, a compressed chunk overwritten: StreamingCacheDataset raised h5py's OSError."""
    out, version, parts = copy
    with h5py.File(parts[1], "r") as f:
        chunk = f["topk_logprobs"].id.get_chunk_info(0)
    data = bytearray(parts[1].read_bytes())
    data[chunk.byte_offset + 16:chunk.byte_offset + 80] = bytes(64)
    parts[1].write_bytes(bytes(data))
    for read in (lambda: [CacheDataset(str(out))[i] for i in range(len(CacheDataset(str(out))))],
                 lambda: list(StreamingCacheDataset(str(out)))):
        with pytest.raises(CacheFileError, match=re.escape(str(parts[1]))):
            read()
    err = _one_line_exit_2(["inspect", str(out), "--deep"], capsys)
    assert str(parts[1]) in err and "sha256" in err


@pytest.mark.parametrize("how", ["truncated part", "missing part", "garbage index", "no manifest"])
def test_inspect_of_a_damaged_s3_cache_is_one_line(how, bucket, moto_endpoint, small_teacher_dir, corpus_path,
                                                   capsys):
    """It printed a 45-line botocore traceback, and the command line had no way to reach an endpoint."""
    from s3helpers import s3_options

    uri, opts = f"s3://{bucket}/kd", s3_options(moto_endpoint)
    build(validate("demo", overrides(small_teacher_dir, corpus_path, uri, dataset={"max_samples": 12},
                                              output={"storage_options": opts}, run={"num_shards": 1})))
    flags = ["--storage-option", f"endpoint_url={moto_endpoint}"]
    assert cli.main(["inspect", uri, *flags]) == 0
    capsys.readouterr()
    fs, _ = io.filesystem(uri, opts)
    version = f"{bucket}/kd/versions/" + json.loads(fs.cat_file(f"{bucket}/kd/latest.json"))["version"]
    part = sorted(p for p in fs.find(version) if p.endswith(".h5") and "/parts/" in p)[-1]
    if how == "truncated part":
        fs.pipe_file(part, fs.cat_file(part)[:5000])
    elif how == "missing part":
        fs.rm(part)
    elif how == "garbage index":
        fs.pipe_file(f"{version}/cache.h5", b"garbage" * 100)
    else:
        fs.rm(f"{version}/manifest.json")
    for argv in (["inspect", uri, *flags], ["inspect", uri, "--deep", *flags]):
        err = _one_line_exit_2(argv, capsys)
        assert "s3://" in err, err


@pytest.mark.skipif("build_id" not in Manifest.model_fields, reason="manifests record no build id yet (issue 18, the write side)")
def test_a_same_sized_part_of_another_build_is_refused_by_its_build_id(copy, tmp_path, capsys):
    """A foreign part that the sizes cannot tell apart (here: the manifest restamped to it) is told by the build id
    every part carries against the manifest's."""
    out, version, parts = copy
    with h5py.File(parts[1], "a") as f:
        f.attrs["build_id"] = "another-build"
    _restamp(version, parts[1])
    with pytest.raises(CacheFileError, match="a file of another build"):
        reader = CacheReader(str(out))
        [reader[i] for i in range(len(reader))]
    with pytest.raises(CacheFileError, match="a file of another build"):
        list(StreamingCacheDataset(str(out)))
    err = _one_line_exit_2(["inspect", str(out)], capsys)
    assert str(parts[1]) in err and "another build" in err
