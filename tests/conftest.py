"""Shared fixtures: a small real corpus, a tokenizer trained on it, and two tiny Llama teachers.

All are built once per test session (a few seconds, a few MB) from the Python standard library's docstrings,
so no test needs the network. The environment is set offline and telemetry-free before anything imports
huggingface or Prefect.
"""

import atexit
import os
import shutil
import tempfile

# Module level on purpose: these must be set before transformers, datasets or Prefect are first imported.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    # CacheDataset's local copies of remote parts (kd_core.partcache): this session's own, not the user's.
    KD_CACHE_PARTS=tempfile.mkdtemp(prefix="kd-test-parts-"),
)
atexit.register(shutil.rmtree, os.environ["KD_CACHE_PARTS"], True)

from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from kd_core.demo import build_corpus, build_teacher, train_tokenizer  # noqa: E402

# Rows of the corpus fixture that hold no text, for the edge cases of tokenization and empty samples.
BLANK_ROWS = {3: "", 7: " \n\t  "}


@pytest.fixture(scope="session")
def corpus_blank_rows() -> dict[int, str]:
    """{row number: text} of the rows of corpus_path that are empty (row 3) or whitespace only (row 7)."""
    return dict(BLANK_ROWS)


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    """A parquet file, one column `text`: 300 stdlib docstrings (200 to a few thousand chars), 302 rows in all.

    Row 3 is the empty string and row 7 is whitespace only (see corpus_blank_rows); every other row is a real
    docstring, in build_corpus's deterministic order.
    """
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    build_corpus(path, max_docs=300)
    texts = pq.read_table(path).column("text").to_pylist()
    for row, text in sorted(BLANK_ROWS.items()):
        texts.insert(row, text)
    pq.write_table(pa.table({"text": texts}), path)
    return path


@pytest.fixture(scope="session")
def corpus_texts(corpus_path) -> list[str]:
    """The rows of corpus_path, in order."""
    return pq.read_table(corpus_path).column("text").to_pylist()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_texts) -> Path:
    """A byte-level BPE tokenizer (1000 tokens, BOS prepended) trained on corpus_path."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus_texts, out, vocab_size=1000)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama (hidden 32, 1 layer, untrained) whose vocab, 70000, exceeds its tokenizer's 1000.

    Its top-k ids need uint32, and it has output rows no tokenizer id maps to, like many hub models.
    Left untrained on purpose: its top-k ids then spread over the whole 70000 rows, so ids above 65535 (and above
    the tokenizer) show up in every few tokens; training would also cost ~0.25 s a step for the 70000-row head.
    The directory holds the model and the tokenizer: load both with from_pretrained(teacher_dir).
    """
    out = tmp_path_factory.mktemp("teacher")
    build_teacher(tokenizer_dir, out, vocab_size=70000, hidden_size=32, num_layers=1)
    return out


@pytest.fixture(scope="session")
def small_teacher_dir(tmp_path_factory, tokenizer_dir, corpus_texts) -> Path:
    """A tiny Llama (hidden 32, 2 layers, briefly trained) whose vocab equals its tokenizer's 1000 (uint16 ids).

    The directory holds the model and the tokenizer: load both with from_pretrained(small_teacher_dir).
    """
    out = tmp_path_factory.mktemp("small_teacher")
    build_teacher(
        tokenizer_dir, out, hidden_size=32, num_layers=2,
        train_texts=corpus_texts, train_steps=60, seq_len=64,
    )
    return out
