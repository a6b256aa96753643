"""The teacher never waits on storage: one run_teacher pass over a shard's parts (each batched as if run alone),
files closed, published and recorded on a background thread with bounded back-pressure, errors surfacing in the
caller, and a resumed run byte-identical to a clean one."""

import threading
import time

import pytest
from s3helpers import assert_same_arrays, overrides, read_arrays, reference_arrays  # noqa: F401

from kd_core import h5cache, data, inference, io
from kd_core.build import validate
from kd_core.config import TeacherConfig
from kd_core.errors import ConfigError, StorageError
from kd_core.estimate import BACKGROUND_FILES
from kd_core.inference import PartEnd, run_teacher
from kd_core.merge import merge
from kd_core.shard import plan, run_shard
from kd_core.store import Store
from kd_core.teacher import load_teacher


@pytest.fixture
def batches(monkeypatch):
    """Every batch run_teacher forms, as the source rows it holds (recorded from inference._grid)."""
    seen, real = [], inference._grid

    def recording(samples, layout):
        seen.append(tuple(samples[j][0] for j in layout.samples))
        return real(samples, layout)

    monkeypatch.setattr(inference, "_grid", recording)
    return seen


def forward_times(monkeypatch) -> list[tuple[float, float]]:
    """(start, end) of every batch's forward (inference.Forward.__call__), host clock: the CPU runs it in place."""
    times, real = [], inference.Forward.__call__

    def timed(self, batch):
        start = time.perf_counter()
        try:
            return real(self, batch)
        finally:
            times.append((start, time.perf_counter()))

    monkeypatch.setattr(inference.Forward, "__call__", timed)
    return times


def test_parts_in_one_pass_are_batched_and_computed_as_if_run_alone(small_teacher_dir, corpus_texts, batches,
                                                                    monkeypatch):
    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))
    samples = list(enumerate(corpus_texts[:30]))  # rows 3 and 7 hold no text
    sizes = [9, 0, 6, 15]  # an empty part too
    args = dict(top_k=8, max_length=48, batch_tokens=96, window_tokens=200)  # several windows per part
    with monkeypatch.context() as m:
        timeline = forward_times(m)
        items = list(run_teacher(teacher, samples, parts=sizes, **args))
    one_pass, batches[:] = list(batches), []

    alone, at = [], 0
    for size in sizes:  # the way each part ran before: a run_teacher call of its own, then its end (None here)
        alone += [*run_teacher(teacher, samples[at:at + size], **args), None]
        at += size
    assert one_pass == batches and len(one_pass) > 2 * len(sizes)  # the same batches, part by part

    ends = [(i, item) for i, item in enumerate(items) if isinstance(item, PartEnd)]
    assert [end for _, end in ends] == [PartEnd(0, 9, 2), PartEnd(1, 0, 0), PartEnd(2, 6, 0), PartEnd(3, 15, 0)]
    assert [i for i, _ in ends] == [i for i, item in enumerate(alone) if item is None]
    for got, want in zip(items, alone):
        if isinstance(got, PartEnd):
            continue
        assert got.sample_index == want.sample_index
        for name in ("input_ids", "topk_indices", "topk_logprobs", "logsumexp"):
            assert getattr(got, name).tobytes() == getattr(want, name).tobytes(), name
    busy, span = sum(end - start for start, end in timeline), timeline[-1][1] - timeline[0][0]
    longest = max(b[0] - a[1] for a, b in zip(timeline, timeline[1:]))
    assert len(timeline) == len(one_pass) and 0 < busy <= span and 0 <= longest < span


def test_the_teacher_runs_on_while_a_file_uploads(small_teacher_dir, corpus_path, tmp_path, monkeypatch):
    """Part 0's upload is held until the teacher's rows of part 1 reach the writer: possible only with the upload
    in the background (background_files=0, the synchronous way, holds it until the wait gives up)."""
    real_append, real_publish = h5cache.CacheWriter.append_rows, io.publish_file
    for files, overlaps in ((1, True), (0, False)):
        config = validate("demo", overrides(small_teacher_dir, corpus_path, str(tmp_path / f"out{files}")))
        part1_rows, held = threading.Event(), []

        def append_rows(self, rows):
            if rows.sample_index >= 10:  # part 1's rows are 10..19
                part1_rows.set()
            real_append(self, rows)

        def publish_file(local, uri, opts=None):
            if "part-00000" in uri:
                held.append(part1_rows.wait(timeout=30 if overlaps else 1))
            return real_publish(local, uri, opts)

        monkeypatch.setattr(h5cache.CacheWriter, "append_rows", append_rows)
        monkeypatch.setattr(io, "publish_file", publish_file)
        record = run_shard(config, plan(config).shards[0], background_files=files)
        assert held == [overlaps] and len(record.parts) == 3


def test_local_files_are_bounded_when_storage_falls_behind(small_teacher_dir, corpus_path, tmp_path, monkeypatch):
    """A slow store: the writer waits with one finished file queued, never more; records still follow files."""
    uri = str(tmp_path / "out")
    # Samples up to 256 tokens: a 10-sample part is more than one 64 KiB file.
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri, cache={"max_length": 256},
                                    output={"max_object_bytes": 1 << 16}))
    live, most, order = set(), [0], []
    real_init, real_publish, real_write = h5cache.CacheWriter.__init__, io.publish_file, Store.write_record

    def init(self, path, **kw):  # a file exists locally from its writer's start to the end of its publish
        real_init(self, path, **kw)
        live.add(path.name)
        most[0] = max(most[0], len(live))

    def slow_publish(local, uri, opts=None):
        time.sleep(0.15)
        stamp = real_publish(local, uri, opts)
        live.discard(local.name)
        order.append(uri.rsplit("/", 1)[1])
        return stamp

    def write(self, uri, record):
        if "/part-" in uri:  # not the shard's record
            order.append(uri.rsplit("/", 1)[1])
        real_write(self, uri, record)

    monkeypatch.setattr(h5cache.CacheWriter, "__init__", init)
    monkeypatch.setattr(io, "publish_file", slow_publish)
    monkeypatch.setattr(Store, "write_record", write)
    record = run_shard(config, plan(config).shards[0])
    files = [f.name.rsplit("/", 1)[1] for p in record.parts for f in p.files]
    assert len(files) > 3 and most[0] == 1 + BACKGROUND_FILES
    want = [name for p in record.parts for name in [*(f.name.rsplit("/", 1)[1] for f in p.files),
                                                    f"part-{p.part:05d}.json"]]
    assert order == want  # every file before its part's record, parts in order


def test_an_upload_error_in_the_background_stops_the_run_with_its_message(small_teacher_dir, corpus_path, tmp_path,
                                                                          monkeypatch):
    uri = str(tmp_path / "out")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri))
    key = config.key
    shard = plan(config).shards[0]
    real_publish = io.publish_file

    def failing(local, dest, opts=None):
        if "part-00001" in dest:
            raise StorageError(f"uploading {dest}: still failing after 4 attempts (EndpointConnectionError)")
        return real_publish(local, dest, opts)

    monkeypatch.setattr(io, "publish_file", failing)
    with pytest.raises(StorageError, match=r"^uploading .*part-00001-0000\.h5: still failing after 4 attempts"):
        run_shard(config, shard)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert not [f for f in left if f.endswith(".partial") or "part-00002" in f], left  # part 2: nothing
    assert (tmp_path / "out" / "work" / key / shard.name / "part-00000.json").exists()
    assert not (tmp_path / "out" / "work" / key / shard.name / "part-00001.json").exists()


def test_a_resumed_shard_batches_and_writes_exactly_as_a_clean_run(small_teacher_dir, corpus_path, tmp_path,
                                                                   reference_arrays, batches, monkeypatch):
    """Killed while part 1 uploads (part 2 already running on the teacher), then resumed at part 1: the batches
    of the parts it redoes, and every array of the cache, are those of the uninterrupted run."""
    config = validate("demo", overrides(small_teacher_dir, corpus_path, str(tmp_path / "clean")))
    shard = plan(config).shards[0]
    run_shard(config, shard)
    clean, batches[:] = list(batches), []

    config = validate("demo", overrides(small_teacher_dir, corpus_path, str(tmp_path / "out")))
    real_publish = io.publish_file

    def killed(local, uri, opts=None):
        if "part-00001" in uri:
            raise KeyboardInterrupt
        return real_publish(local, uri, opts)

    monkeypatch.setattr(io, "publish_file", killed)
    with pytest.raises(KeyboardInterrupt):
        run_shard(config, shard)
    monkeypatch.setattr(io, "publish_file", real_publish)
    batches[:] = []
    record = run_shard(config, shard)
    assert [p.part for p in record.parts] == [0, 1, 2]
    redone = {row for batch in batches for row in batch}
    assert min(redone) == 10 and batches == [b for b in clean if min(b) >= 10]  # parts 1 and 2, batched alike
    merge(config, [record, run_shard(config, plan(config).shards[1])])
    assert_same_arrays(read_arrays(str(tmp_path / "out")), reference_arrays)


def test_background_runs_jobs_in_order_bounded_and_stops_at_the_first_error():
    done, dropped, release = [], [], threading.Event()
    with io.Background(files=1) as background:
        background.submit(lambda: (release.wait(5), done.append("file 0")), lambda: dropped.append(0))
        background.submit(lambda: done.append("record 0"))  # holds no file: never waits
        waiter = threading.Thread(target=background.submit,
                                  args=(lambda: done.append("file 1"), lambda: dropped.append(1)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and done == []  # back-pressure: file 1 waits for file 0's slot
        release.set()
        waiter.join(5)
    assert done == ["file 0", "record 0", "file 1"] and dropped == []

    error, gate = OSError(28, "No space left on device"), threading.Event()

    def fail():
        gate.wait(5)
        raise error

    background = io.Background(files=2)
    background.submit(fail, lambda: None)
    background.submit(lambda: done.append("after the error"), lambda: dropped.append(2))
    gate.set()
    with pytest.raises(OSError) as raised:
        background.close()
    assert raised.value is error and dropped == [2] and "after the error" not in done  # the same exception
    with pytest.raises(OSError):
        background.submit(lambda: None, lambda: dropped.append(3))
    assert dropped == [2, 3]

    inline = []
    io.Background(files=0).submit(lambda: inline.append(threading.current_thread()))
    assert inline == [threading.current_thread()]  # files=0: the synchronous way, in the caller


def test_a_dataset_that_ends_early_stops_at_the_short_part_and_keeps_the_parts_before(small_teacher_dir, corpus_path,
                                                                                      tmp_path, monkeypatch):
    """The source held fewer rows than planned (changed since planning): a clear error at the first short part;
    the complete parts before it, already handed to the background, are still published and recorded."""
    uri = str(tmp_path / "out")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri))
    key = config.key
    shard = plan(config).shards[0]  # rows 0..29, parts of 10
    real_iter_texts = data.iter_texts
    monkeypatch.setattr(data, "iter_texts",
                        lambda *a: (row for row in real_iter_texts(*a) if row[0] < 25))
    with pytest.raises(ConfigError, match=r"^dataset.max_samples: the dataset ended at row 25, before the "
                                                   r"30 rows planned. Fix: dataset.max_samples=25 or fewer.$"):
        run_shard(config, shard)
    records = sorted(p.name for p in (tmp_path / "out" / "work" / key / shard.name).iterdir())
    assert records == ["part-00000.json", "part-00001.json"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial") or "part-00002" in p.name]
