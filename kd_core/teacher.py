"""Loading the teacher: a Hugging Face causal LM and its tokenizer, on the right device and dtype.

Everything that needs the teacher goes through here, so that the model, the tokenizer and the vocab size
always come from the same path and revision. `teacher_vocab_size` and `load_tokenizer` load no weights: the
config checks and the storage estimate use them before any GPU is involved.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kd_core.errors import ConfigError

if TYPE_CHECKING:
    from kd_core.config import TeacherConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How the teacher attends, and whether batches pack several samples per row (kd_core.inference.Batch): the one
# place to change either. "sdpa" is PyTorch's scaled_dot_product_attention: right-padded batches (one sample a
# row) use its is_causal kernels (flash on CUDA), which skip the masked half; packed batches get a block-diagonal
# causal mask that transformers materializes as (B, 1, T, T), which no flash kernel takes. Both give the same
# rows (tests/test_packing.py); which is faster per real token is a GPU measurement (bench/gpu_packing.py,
# docs/PERFORMANCE.md). With PACK_SEQUENCES, packing is used only where packing_works says the teacher honours it.
ATTN_IMPLEMENTATION = "sdpa"
PACK_SEQUENCES = False


@dataclass
class Teacher:
    """A loaded teacher. vocab_size is the model's output width, which may exceed len(tokenizer)."""

    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any
    device: torch.device  # where inputs go (the embedding's device when device_map spreads the model)
    dtype: torch.dtype
    vocab_size: int
    packing: bool = False  # batches pack several samples per row (PACK_SEQUENCES and packing_works)

    def tokenize(self, text: str, max_length: int) -> list[int]:
        """The cache's tokens for one text, exactly as DESIGN.md fixes them (default special tokens)."""
        return self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]

    def tokenize_many(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Same tokens as `tokenize` for each text; one call lets the Rust tokenizer work in parallel."""
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _looks_local(path: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else (absolute, ./, ~, deeper) is meant as a local path."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def _load(what: str, cfg: TeacherConfig, fn, **kwargs):
    """Call a from_pretrained and turn any failure into a ConfigError naming teacher.model and the cause."""
    path = cfg.model  # demo paths were resolved when the config was loaded
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ConfigError(f"teacher.model: local path {path!r} does not exist. Point it at a model directory.")
    if os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"teacher.model: {path!r} is a file; a local teacher is a directory holding config.json, "
                          "the weights and the tokenizer (as save_pretrained writes it). Point it at that directory.")
    try:
        return fn(
            os.path.expanduser(path),
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        if os.path.isdir(os.path.expanduser(path)):
            hint = f"the local directory {path!r} holds no loadable {what}"
        else:
            hint = (
                f"{path!r} is not a local path, so it is read as a hub id: it needs network access "
                f"(or the Hugging Face cache), the right name/revision, and a token if it is gated"
            )
        raise ConfigError(f"teacher.model: cannot load the {what}: {hint}. ({type(e).__name__}: {e})") from None


def teacher_vocab_size(cfg: TeacherConfig) -> int:
    """The teacher's output width from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = _load("config", cfg, AutoConfig.from_pretrained)
    return int(config.get_text_config().vocab_size)


def teacher_num_parameters(cfg: TeacherConfig) -> int:
    """The teacher's parameter count from its config alone: the model is built on the meta device (no memory,
    no weights read); tied input/output embeddings count once."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _load("config", cfg, AutoConfig.from_pretrained)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    model.tie_weights()  # on the meta device from_config leaves tied embeddings as two tensors
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(cfg: TeacherConfig):
    """The teacher's tokenizer alone (the storage probe tokenizes real samples with it)."""
    from transformers import AutoTokenizer

    return _load("tokenizer", cfg, AutoTokenizer.from_pretrained)


def auto_dtype(device: str) -> str:
    """What teacher.dtype=auto means for teacher.device on this machine: bfloat16 on CUDA, else float32."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if cuda else "float32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("teacher.device: cuda was asked for but no CUDA GPU is visible. Use auto or cpu.")
    return torch.device(device)


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Model + tokenizer from the same path/revision, in eval mode, on cfg's device and dtype."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = _DTYPES.get(cfg.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = load_tokenizer(cfg)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": ATTN_IMPLEMENTATION}
    if cfg.device_map == "auto":
        kwargs["device_map"] = "auto"  # accelerate spreads the layers over the visible GPUs (and CPU)
    model = _load("model", cfg, AutoModelForCausalLM.from_pretrained, **kwargs)
    if cfg.device_map != "auto":
        model.to(device)
    model.eval()
    # Inputs go where the embedding runs: the first layer's device when accelerate spread the model.
    device = execution_device(model.get_input_embeddings())
    head = model.get_output_embeddings()
    vocab_size = head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size
    packing = PACK_SEQUENCES and packing_works(model, device)
    return Teacher(model=model, tokenizer=tokenizer, device=device, dtype=dtype, vocab_size=int(vocab_size),
                   packing=packing)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its weights' device, or accelerate's execution device for a module that
    device_map offloaded (weights kept on "cpu"/"disk", on "meta" in the module, loaded by a hook where it runs)."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


_PROBE_LENGTHS = (7, 9)  # two samples packed in one row of 16 by packing_works


def packing_works(model: Any, device: torch.device) -> bool:
    """Whether the model, given position_ids that restart at 0 for each sample of a row, keeps the samples apart.

    Two random sequences a, b packed in one row [a b], beside a row holding b alone then padding (as
    kd_core.inference lays batches out), against b run alone: b's logits must match. A model that ignores the
    packing lets b attend to a; how far that moves b's logits (b after a in one plain causal row) is the scale:
    packing is on when the packed error is under 1% of it (float32: ~1e-6 against ~1e-1; bf16 leaves room for
    its rounding, which moves with the batch's shape anyway).
    """
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) or model.config.get_text_config().vocab_size
    a, b = (torch.randint(vocab, (n,), generator=gen) for n in _PROBE_LENGTHS)
    width = len(a) + len(b)

    def logits(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (R, W) -> (R, W, V) float32 on CPU
        out = model(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False).logits
        return out.float().cpu()

    packed_ids = torch.stack([torch.cat([a, b]), torch.cat([b, torch.zeros(len(a), dtype=torch.long)])])  # (2, W)
    packed_positions = torch.stack([torch.cat([torch.arange(len(a)), torch.arange(len(b))]), torch.arange(width)])
    try:
        with torch.inference_mode():
            alone = logits(b[None], torch.arange(len(b))[None])[0]  # (9, V)
            packed = logits(packed_ids, packed_positions)  # (2, W, V)
            leaked = logits(torch.cat([a, b])[None], torch.arange(width)[None])[0, len(a):]  # b seeing a
    except Exception as e:  # a model that refuses position_ids or this layout: keep the padded batches
        warnings.warn(f"packing off: the packed probe failed ({type(e).__name__}: {e})", stacklevel=2)
        return False
    error = max((packed[0, len(a):] - alone).abs().max(), (packed[1, : len(b)] - alone).abs().max())
    return bool(error <= 0.01 * (leaked - alone).abs().max())
