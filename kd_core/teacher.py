"""Loading the teacher: a Hugging Face causal LM and its tokenizer, on the right device and dtype.

Everything that needs the teacher goes through here, so that the model, the tokenizer and the vocab size
always come from the same path and revision. `teacher_vocab_size` and `load_tokenizer` load no weights: the
config checks and the storage estimate use them before any GPU is involved.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from kd_core.config import TeacherConfig
from kd_core.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How the teacher attends, the one place to change it. "sdpa" is PyTorch's scaled_dot_product_attention: the
# right-padded batches of kd_core.inference need no mask, so it runs its is_causal kernels (flash on CUDA). Packing
# several samples a row (a block-diagonal mask) was measured slower with sdpa and flex_attention as transformers
# drives them (docs/PERFORMANCE.md, "Padding and packing").
ATTN_IMPLEMENTATION = "sdpa"


@dataclass
class Teacher:
    """A loaded teacher. vocab_size is the model's output width, which may exceed len(tokenizer)."""

    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode
    tokenizer: Any
    device: torch.device  # where inputs go (the embedding's device when device_map spreads the model)
    dtype: torch.dtype
    vocab_size: int

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
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle that would run code
        raise ConfigError(f"teacher.model: the {what}'s weights in {path!r} are a pickle that would run code when loaded "
                          "(refused, nothing ran). Use a teacher with safetensors weights, or one you trust converted "
                          "to safetensors.") from None
    except (OSError, ValueError) as e:
        if os.path.isdir(os.path.expanduser(path)):
            hint = f"the local directory {path!r} holds no loadable {what}"
        else:
            hint = (
                f"{path!r} is not a local path, so it is read as a hub id: it needs network access "
                f"(or HF_HUB_OFFLINE=1 with the model in the Hugging Face cache), the right name/revision, and a "
                f"token (HF_TOKEN) if it is gated. Fix: one of those, or a local directory"
            )
        cause = " ".join(str(e).split())  # transformers' messages span lines; ours is one
        raise ConfigError(f"teacher.model: cannot load the {what}: {hint}. ({type(e).__name__}: {cause})") from None


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


def resolve_dtype(config: TeacherConfig) -> str:
    """teacher.dtype with auto resolved as on this machine: bfloat16 where the teacher runs on CUDA, float32 on
    CPU. The build resolves it once and records it in its config (the version key covers it)."""
    if config.dtype != "auto":
        return config.dtype
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
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
    return Teacher(model=model, tokenizer=tokenizer, device=device, dtype=dtype, vocab_size=int(vocab_size))


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its weights' device, or accelerate's execution device for a module that
    device_map offloaded (weights kept on "cpu"/"disk", on "meta" in the module, loaded by a hook where it runs)."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device
