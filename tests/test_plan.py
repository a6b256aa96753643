"""Shard planning from the source's layout: shards that read only their own rows, planned from footers in seconds."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3helpers import assert_same_arrays, build, overrides, read_arrays

from flows import cli
from kd_core import data
from kd_core.build import validate
from kd_core.config import DatasetConfig
from kd_core.errors import ConfigError
from kd_core.shard import plan


def write_parquet(root, files: int, groups: int, group_rows: int) -> str:
    """`files` parquet files of `groups` row groups of `group_rows` rows; row i's text is f"row {i}"."""
    root.mkdir(parents=True, exist_ok=True)
    rows_per_file = groups * group_rows
    for f in range(files):
        texts = [f"row {i}" for i in range(f * rows_per_file, (f + 1) * rows_per_file)]
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), root / f"part-{f:03d}.parquet",
                       row_group_size=group_rows)
    return str(root / "*.parquet")


@pytest.fixture(scope="module")
def web_scale(tmp_path_factory) -> str:
    """160,000 rows in 40 files of 4 row groups (1,000 rows each)."""
    return write_parquet(tmp_path_factory.mktemp("web"), files=40, groups=4, group_rows=1000)


def dataset(data_files: str, **extra) -> DatasetConfig:
    return DatasetConfig(name="parquet", data_files=data_files, streaming=True, **extra)


def test_plan_from_parquet_footers_covers_the_run_and_reads_at_most_a_group_more_per_shard(web_scale):
    started = time.perf_counter()
    plan = data.plan(dataset(web_scale, max_samples=150_000), 64)
    seconds = time.perf_counter() - started
    assert plan.method == "parquet footers" and plan.source_rows == 160_000
    assert [s.index for s in plan.shards] == list(range(64))
    assert plan.shards[0].start == 0 and plan.shards[-1].stop == 150_000
    assert all(a.stop == b.start for a, b in zip(plan.shards, plan.shards[1:]))  # contiguous, in order
    assert sum(s.rows_read for s in plan.shards) <= 150_000 + 64 * 1000
    assert all(s.rows_read - s.num_samples < 1000 for s in plan.shards)
    assert seconds < 10, f"planning took {seconds:.1f} s"


def test_kd_cache_plan_json(web_scale, capsys):
    started = time.perf_counter()
    assert cli.main(["plan", "--profile", "testing", "dataset.name=parquet", f"dataset.data_files={web_scale}",
                     "dataset.streaming=true", "dataset.max_samples=150000", "run.num_shards=64", "--json"]) == 0
    seconds = time.perf_counter() - started
    printed = json.loads(capsys.readouterr().out)
    shards = printed["shards"]
    assert [list(s) for s in shards] == [["index", "start", "stop", "rows_read"]] * 64
    assert shards[0]["start"] == 0 and shards[-1]["stop"] == 150_000
    assert all(a["stop"] == b["start"] for a, b in zip(shards, shards[1:]))
    assert printed["rows_read"] == sum(s["rows_read"] for s in shards) <= 150_000 + 64 * 1000
    assert seconds < 10, f"kd-cache plan took {seconds:.1f} s"


def test_a_shard_opens_only_its_files_and_reads_exactly_its_rows(web_scale, monkeypatch):
    cfg = dataset(web_scale, max_samples=150_000)
    shard = data.plan(cfg, 64).shards[37]  # rows [86718, 89062): the end of file 21, the start of file 22
    opened = []
    real = data._parquet_file
    monkeypatch.setattr(data, "_parquet_file", lambda path, *a: opened.append(path) or real(path, *a))
    rows = list(data.iter_texts(cfg, shard, shard.start, shard.stop))
    assert rows == [(i, f"row {i}") for i in range(shard.start, shard.stop)]
    assert [p.rsplit("/", 1)[1] for p in opened] == ["part-021.parquet", "part-022.parquet"]
    # A resumed shard starts reading at its resume point, not at its first row.
    assert list(data.iter_texts(cfg, shard, 88_500, 88_503)) == [(88_500, "row 88500"), (88_501, "row 88501"),
                                                                  (88_502, "row 88502")]


def test_every_row_once_in_order_over_all_shards(web_scale):
    cfg = dataset(web_scale, max_samples=10_007)
    texts = [t for s in data.plan(cfg, 7).shards for _, t in data.iter_texts(cfg, s, s.start, s.stop)]
    assert texts == [f"row {i}" for i in range(10_007)]


def test_max_samples_larger_than_the_source_is_found_in_planning(web_scale):
    with pytest.raises(ConfigError, match=r"dataset\.max_samples \(200,000\) is larger than the split, which has "
                                          r"160,000 samples"):
        data.plan(dataset(web_scale, max_samples=200_000), 8)


def test_json_files_are_counted_once_and_shards_read_only_their_files(tmp_path, monkeypatch):
    for f in range(3):
        rows = [json.dumps({"text": f"row {f * 10 + i}"}) + "\n" for i in range(10)]
        (tmp_path / f"{f}.jsonl").write_text("".join(rows))
    cfg = DatasetConfig(name="json", data_files=str(tmp_path / "*.jsonl"), streaming=True, max_samples=25)
    plan = data.plan(cfg, 2)
    assert plan.method == "counted files"
    assert [(s.start, s.stop, s.rows_read) for s in plan.shards] == [(0, 12, 12), (12, 25, 15)]
    assert [seg.path.rsplit("/", 1)[1] for seg in plan.shards[1].segments] == ["1.jsonl", "2.jsonl"]
    texts = [t for s in plan.shards for _, t in data.iter_texts(cfg, s, s.start, s.stop)]
    assert texts == [f"row {i}" for i in range(25)]
    with pytest.raises(ConfigError, match=r"dataset\.max_samples \(31\) is larger than the split, which has 30"):
        data.plan(cfg.model_copy(update={"max_samples": 31}), 2)


def test_five_shards_make_the_same_cache_as_one(tmp_path, small_teacher_dir, corpus_texts):
    files = tmp_path / "corpus"
    files.mkdir()
    for f in range(3):  # the corpus's first 60 rows in 3 files of row groups of 7 rows
        pq.write_table(pa.table({"text": corpus_texts[f * 20:(f + 1) * 20]}), files / f"{f}.parquet", row_group_size=7)
    arrays = []
    for shards in (1, 5):
        uri = str(tmp_path / f"out{shards}")
        config = validate("demo", overrides(small_teacher_dir, str(files / "*.parquet"), uri,
                                                     run={"num_shards": shards, "part_samples": 12}))
        assert len(plan(config).shards) == shards
        build(config)
        arrays.append(read_arrays(uri))
    assert_same_arrays(*arrays)
    assert list(arrays[0]["sample_index"]) == [i for i in range(60) if i not in (3, 7)]


@pytest.mark.parametrize("builder", ["parquet", "json"])
@pytest.mark.parametrize("streaming", [True, False])
def test_a_text_column_renamed_in_one_file_is_one_clear_line(tmp_path, builder, streaming):
    """The text column is checked in the first file at validate time; a later file (or one rewritten since) whose
    column was renamed was an IndexError (parquet) or a KeyError (json) in the middle of a shard's work."""
    paths = []
    for i, column in enumerate(["text", "body"]):
        rows = [{column: f"row {i}.{j}"} for j in range(5)]
        path = tmp_path / f"f{i}.{builder}"
        if builder == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(path))
    cfg = DatasetConfig(name=builder, data_files=paths, streaming=streaming, max_samples=10)
    with pytest.raises(ConfigError) as e:  # at planning (a split datasets loads whole) or at reading
        shard = data.plan(cfg, 1).shards[0]
        list(data.iter_texts(cfg, shard, 0, 10))
    message = str(e.value)
    assert len(message.splitlines()) == 1 and message.startswith("dataset.text_column: "), message
    assert "'text'" in message and "body" in message, message
