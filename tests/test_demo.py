"""The demo assets and the builders behind the test fixtures: real corpus, working tokenizer, loadable teachers."""

import logging
import re
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kd_core import demo
from kd_core.errors import ConfigError


def test_corpus_is_real_docstrings_with_a_spread_of_lengths(corpus_texts, corpus_blank_rows):
    docs = [t for i, t in enumerate(corpus_texts) if i not in corpus_blank_rows]
    assert len(docs) == 300 and len(set(docs)) == 300
    lengths = sorted(len(d) for d in docs)
    assert lengths[0] >= 200 and lengths[-1] >= 2000 and lengths[len(lengths) // 2] < 1000
    # cleandoc'ed: no common indent left, no leading/trailing blank lines
    assert all(d == d.strip("\n") and not d.startswith(" ") for d in docs)
    assert sum("Return" in d for d in docs) > 30  # prose about code, as in the stdlib
    for row, text in corpus_blank_rows.items():
        assert corpus_texts[row] == text and not text.strip()


def test_build_corpus_is_deterministic_and_respects_limits(tmp_path, corpus_texts, corpus_blank_rows):
    n = demo.build_corpus(tmp_path / "c.parquet", max_docs=20, min_chars=500)
    texts = pq.read_table(tmp_path / "c.parquet").column("text").to_pylist()
    assert n == len(texts) == 20 and min(map(len, texts)) >= 500
    docs = [t for i, t in enumerate(corpus_texts) if i not in corpus_blank_rows]
    assert texts == [d for d in docs if len(d) >= 500][:20]
    assert [p.name for p in tmp_path.iterdir()] == ["c.parquet"]  # no temp file left behind


def test_tokenizer_round_trips_with_bos(tokenizer_dir, corpus_texts):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 1000
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for text in [corpus_texts[0], "Ünïcode ✓ and\ttabs\n\n  indents", ""]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(corpus_texts[0], truncation=True, max_length=16)["input_ids"] == tok(corpus_texts[0])["input_ids"][:16]


def test_teacher_vocab_exceeds_tokenizer(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    assert model.config.vocab_size == 70000 > 65536 > len(tok) == 1000
    assert model.dtype == torch.float32
    ids = tok("Return the value.", return_tensors="pt")["input_ids"]  # (1, L)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # (1, L, 70000)
    assert logits.shape == (1, ids.shape[1], 70000)
    assert (logits.topk(16).indices > 65535).any()  # untrained: ids that need uint32 do come up


def test_small_teacher_vocab_matches_tokenizer(small_teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(small_teacher_dir)
    tok = AutoTokenizer.from_pretrained(small_teacher_dir)
    assert model.config.vocab_size == len(tok) == 1000
    assert (model.config.bos_token_id, model.config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)


def test_trained_teacher_beats_untrained(tmp_path, tokenizer_dir, small_teacher_dir, corpus_texts):
    cfg = AutoConfig.from_pretrained(small_teacher_dir)
    demo.build_teacher(tokenizer_dir, tmp_path, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers)
    tok = AutoTokenizer.from_pretrained(small_teacher_dir)
    blocks = demo._token_blocks(tok, corpus_texts[-40:], 64)  # (N, 64)

    def loss(path):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(path)(input_ids=blocks, labels=blocks).loss.item()

    assert loss(small_teacher_dir) < loss(tmp_path) - 0.5


def test_build_teacher_is_deterministic(tmp_path, tokenizer_dir, corpus_texts):
    for name in ("a", "b"):
        demo.build_teacher(
            tokenizer_dir, tmp_path / name, hidden_size=32, num_layers=1,
            train_texts=corpus_texts[:50], train_steps=3, seq_len=32, seed=7,
        )
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KD_CACHE_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.demo_dir() == tmp_path / "home" / ".cache" / "kd-cache" / "demo-v1"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.demo_dir() == tmp_path / "xdg" / "kd-cache" / "demo-v1"
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path / "kd"))
    assert demo.demo_dir() == tmp_path / "kd" / "demo-v1"


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """Point demo_dir() at tmp_path and replace the real (40 s) build with a fast fake; yields its call log."""
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path))
    calls = []

    def build(out):
        calls.append(out)
        time.sleep(0.2)  # long enough for a racing thread to reach the lock
        (out / "teacher").mkdir()
        (out / "corpus.parquet").write_text("x")

    monkeypatch.setattr(demo, "_build_demo", build)
    return calls


def test_ensure_demo_assets_builds_once_under_a_race(fake_build, tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo_assets())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "demo-v1"] * 3 and len(fake_build) == 1
    assert demo.ensure_demo_assets() == tmp_path / "demo-v1" and len(fake_build) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-v1.lock", "demo-v1"]  # no temp dir left


def test_failed_build_leaves_nothing_and_is_retried(fake_build, monkeypatch, tmp_path):
    def broken(out):
        (out / "half-written").write_text("x")
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(demo, "_build_demo", broken)
        with pytest.raises(RuntimeError):
            demo.ensure_demo_assets()
    assert not (tmp_path / "demo-v1").exists() and len(list(tmp_path.iterdir())) == 1  # just the lock file
    assert demo.ensure_demo_assets() == tmp_path / "demo-v1" and len(fake_build) == 1


def test_resolve_path(fake_build, tmp_path):
    for value in ["gpt2", "./models/teacher", "s3://bucket/corpus.parquet", "demo/teacher", "x@demo/teacher"]:
        assert demo.resolve_path(value) == value
    assert not fake_build  # plain values never trigger a build
    assert demo.resolve_path("@demo/teacher") == str(tmp_path / "demo-v1" / "teacher")
    assert demo.resolve_path("@demo/corpus.parquet") == str(tmp_path / "demo-v1" / "corpus.parquet")
    with pytest.raises(ConfigError, match="@demo/corpus.parquet, @demo/teacher"):
        demo.resolve_path("@demo/model")


@pytest.mark.slow
def test_real_demo_assets_from_scratch(monkeypatch, tmp_path, caplog):
    """The real one-time build (~40 s on 2 cores): full corpus, a teacher that learned something."""
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="kd_core.demo"):
        root = demo.ensure_demo_assets()
    texts = pq.read_table(root / "corpus.parquet").column("text").to_pylist()
    assert len(texts) > 1000
    model = AutoModelForCausalLM.from_pretrained(demo.resolve_path("@demo/teacher"))
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(root / "teacher")) == 4096
    before, after = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", caplog.text).groups())
    assert after < before - 2
