"""Offline assets for the `demo` profile, and the builders the tests use for their tiny teachers.

The demo must run with no network: no hub model, no hub dataset. So we build both from what every Python
install ships: the corpus is the docstrings of the standard library (real prose, not written by us), and
the teacher is a small Llama trained for a few seconds on that corpus, with its own byte-level BPE tokenizer.
Assets are built once under demo_dir() and reused; profiles refer to them as `@demo/NAME` (see resolve_path).
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import inspect
import logging
import os
import shutil
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from kd_core.config import DEMO_PREFIX, Config
from kd_core.errors import ConfigError

# torch, tokenizers and transformers are imported inside the builders: resolve_path on built assets (config
# validation, the first thing `kd-cache run` does) should not pay their seconds of import time (torch: 5 s of
# a busy 2-core machine's, before the temporary Prefect server could start).
if TYPE_CHECKING:
    import torch

log = logging.getLogger("kd_core.demo")

# Bump when the assets change, so old caches are left alone and new ones get built.
DEMO_VERSION = "demo-v1"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Test suites and their data files hold docstrings about tests, and parsing them doubles the build time.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# Demo teacher: sized so the whole build takes well under a minute on 2 CPU cores.
_DEMO_VOCAB = 4096
_DEMO_HIDDEN = 128
_DEMO_LAYERS = 2
_DEMO_TRAIN_STEPS = 200
_DEMO_SEQ_LEN = 128


# ---------------------------------------------------------------------------------------------- corpus


def stdlib_docstrings(min_chars: int) -> Iterator[str]:
    """Yield the stdlib's docstrings (modules, classes, functions), cleaned, >= min_chars, first occurrence only."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    seen: set[str] = set()
    for path in files:
        try:
            with warnings.catch_warnings():  # old escape sequences in some modules warn at parse time
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # a few files are deliberately invalid (encoding and grammar test data)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=False)
            if doc is None:
                continue
            doc = inspect.cleandoc(doc)
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                yield doc


def build_corpus(path: Path, max_docs: int | None = None, min_chars: int = 200) -> int:
    """Write the stdlib's docstrings to a parquet file with one `text` column; return the number of rows.

    Sources are parsed with `ast`, never imported, in sorted path order, so the file is the same on every run
    of the same Python. Lengths run from min_chars to several thousand characters. Written atomically.
    """
    texts = []
    for doc in stdlib_docstrings(min_chars):
        if max_docs is not None and len(texts) >= max_docs:
            break
        texts.append(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp)
    os.replace(tmp, path)
    return len(texts)


# ------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on texts and save it as a transformers fast tokenizer that prepends BOS (like Llama).

    Byte-level means every string encodes (no <unk> in practice); <unk> exists only because callers expect one.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, PAD]  # ids 0..3
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    # add_bos_token is passed explicitly: transformers rebuilds the post-processor from it on every load.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=2048,
    )
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------- teacher


def _token_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Pack texts (BOS text EOS, back to back) into non-overlapping blocks: (num_blocks, seq_len) int64."""
    stream: list[int] = []
    for ids in tokenizer(texts, verbose=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"train_texts hold {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    import torch

    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def _train(model, blocks: torch.Tensor, steps: int, seed: int, batch_size: int = 8, lr: float = 3e-3) -> None:
    """A short AdamW run (linear warmup, then linear decay) so the teacher's predictions carry signal."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    probe = blocks[torch.randperm(len(blocks), generator=gen)[:batch_size]]  # (B, L): a fixed batch for the log
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1)))
    )

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=probe, labels=probe).loss.item()
        model.train()
        return loss

    # One thread: these matrices are too small to split well, and when another process holds a core (a Prefect
    # server, a test run) two threads that sync on every op were measured 5-10x slower; one thread, about 2x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before, start = probe_loss(), time.perf_counter()
        for _ in range(steps):
            batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]  # (B, L)
            model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        seconds, after = time.perf_counter() - start, probe_loss()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    log.info("trained teacher %d steps in %.1f s: loss %.2f -> %.2f", steps, seconds, before, after)


def build_teacher(
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    train_texts: list[str] | None = None,
    train_steps: int = 0,
    seq_len: int = 128,
    seed: int = 0,
) -> None:
    """Build a small LlamaForCausalLM (float32, tied embeddings), optionally train it, save it with its tokenizer.

    vocab_size defaults to the tokenizer's length; a larger one gives a model whose output layer exceeds the
    tokenizer (as many hub models do), and above 65536 one whose top-k ids need uint32.
    The result loads with AutoModelForCausalLM/AutoTokenizer.from_pretrained(out_dir). Deterministic per seed.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    heads = max(1, hidden_size // 32)  # head_dim 32
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,  # halves the file; a 70k-row vocab would otherwise dominate it
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if train_texts and train_steps > 0:
        _train(model, _token_blocks(tokenizer, train_texts, seq_len), train_steps, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ------------------------------------------------------------------------------------------ demo cache


def demo_dir() -> Path:
    """Where the demo assets live: $KD_CACHE_HOME/demo-v1, else $XDG_CACHE_HOME/kd-cache/demo-v1, else ~/.cache."""
    if home := os.environ.get("KD_CACHE_HOME"):
        return Path(home) / DEMO_VERSION
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "kd-cache" / DEMO_VERSION


def _build_demo(out: Path) -> None:
    """Build corpus.parquet, then tokenizer and trained teacher/ from it, into the empty directory out."""
    start = time.perf_counter()
    rows = build_corpus(out / "corpus.parquet")
    texts = pq.read_table(out / "corpus.parquet").column("text").to_pylist()
    log.info("demo corpus: %d stdlib docstrings (%.1f s)", rows, time.perf_counter() - start)
    train_tokenizer(texts, out / "tokenizer", _DEMO_VOCAB)
    build_teacher(
        out / "tokenizer",
        out / "teacher",
        hidden_size=_DEMO_HIDDEN,
        num_layers=_DEMO_LAYERS,
        train_texts=texts,
        train_steps=_DEMO_TRAIN_STEPS,
        seq_len=_DEMO_SEQ_LEN,
    )
    shutil.rmtree(out / "tokenizer")  # the teacher dir carries its own copy
    log.info("demo assets built in %.1f s", time.perf_counter() - start)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on lock_path, so concurrent processes build the assets only once."""
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_demo_assets() -> Path:
    """Return demo_dir(), building the assets there first if needed (one time, under a minute).

    The directory only ever appears complete: it is built under a temporary name and renamed. A file lock makes a
    second process wait for the first instead of building too.
    """
    final = demo_dir()
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{DEMO_VERSION}.lock"):
        if final.is_dir():  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{DEMO_VERSION}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building demo teacher and corpus in %s (one time, ~40 s)", final)
        tmp = final.parent / f".{DEMO_VERSION}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            _build_demo(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def resolve_path(value: str) -> str:
    """Map `@demo/NAME` to the real path of demo asset NAME (building the assets if needed); return others as is."""
    if not value.startswith(DEMO_PREFIX):
        return value
    path = ensure_demo_assets() / value[len(DEMO_PREFIX) :]
    if not path.exists():
        available = ", ".join(sorted(DEMO_PREFIX + p.name for p in path.parent.iterdir() if not p.name.startswith(".")))
        raise ConfigError(f"{value!r} is not a demo asset; available: {available}")
    return str(path)


def resolve_demo_paths(config: Config) -> Config:
    """`@demo/NAME` in teacher.model or dataset.data_files (a path or a list of them) -> the asset's real path,
    building the assets on first use: done once where a build is resolved, so that the dataset and teacher
    loaders only ever see real paths. A config without such values comes back as it is."""
    def resolved(value: Any) -> Any:
        if isinstance(value, list):
            return [resolved(v) for v in value]
        return resolve_path(value) if isinstance(value, str) and value.startswith(DEMO_PREFIX) else value

    teacher, dataset = config.teacher.model, config.dataset.data_files
    model, files = resolved(teacher), resolved(dataset)
    if (model, files) == (teacher, dataset):
        return config
    return config.model_copy(update={"teacher": config.teacher.model_copy(update={"model": model}),
                                     "dataset": config.dataset.model_copy(update={"data_files": files})})
