"""The one config model, and how a profile plus overrides becomes a Config.

A run's config is a YAML profile (profiles/NAME.yaml, or a path to any YAML file) with overrides on top.
Overrides come as CLI strings (`dataset.max_samples=1000`, VALUE parsed as YAML, `null` unsets) or as a
nested dict (the Prefect flow's `overrides` parameter). Unknown keys are refused with a "did you mean".

Types are checked here; values that need a longer explanation (the max_samples guard, ranges) are checked in
kd_core.guards so that the messages live in one place.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from kd_core import io
from kd_core.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# The seed system's key, kept so old commands keep working.
KEY_ALIASES = {"distillation.dataset.max_samples": "dataset.max_samples"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(_Section):
    model: str = Field(description="Hugging Face hub id or local path of a causal LM (the teacher).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the teacher.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto is bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto uses CUDA when present.")
    device_map: str | None = Field(
        None, description="Set to 'auto' to spread a teacher too large for one GPU over the worker's GPUs."
    )
    trust_remote_code: bool = Field(False, description="Allow the teacher's repository to run its own code.")
    batch_tokens: int = Field(16384, description="Token budget of one forward batch (padding included).")


class DatasetConfig(_Section):
    name: str = Field(description="Hub dataset id, or a builder such as parquet, json, text.")
    config: str | None = Field(None, description="Dataset configuration (subset) name.")
    split: str = Field("train", description="Split to read.")
    data_files: str | list[str] | dict[str, Any] | None = Field(
        None, description="Files for a builder such as parquet/json/text (local paths or fsspec URLs)."
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    text_column: str = Field("text", description="Column that holds the text.")
    streaming: bool = Field(False, description="Stream the dataset instead of downloading it first.")
    max_samples: int | None = Field(
        None, description="Read exactly this many samples (required when streaming)."
    )


class CacheConfig(_Section):
    top_k: int = Field(64, description="How many of the teacher's most likely next tokens to keep per position.")
    max_length: int = Field(2048, description="Tokens per sample; longer samples are truncated.")


class OutputConfig(_Section):
    uri: str = Field(description="Where the cache goes: a local directory or an fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the target (endpoint, profile). Prefer credentials from the environment.",
    )
    max_bytes: int | None = Field(None, description="Refuse a run whose expected cache is larger than this.")
    keep_versions: int = Field(
        3, ge=0, description="Older complete versions kept beside the latest one; older ones are deleted after "
                             "a new version is published."
    )

    @field_validator("uri")
    @classmethod
    def _one_form(cls, uri: str) -> str:
        # Normalised once, here: the layout, locks, clean-up and messages all derive from this value.
        return io.normalise_uri(uri)


class RunConfig(_Section):
    num_shards: int = Field(1, description="Independent pieces of the dataset, each one teacher-inference run.")
    part_samples: int = Field(
        10_000, ge=1,
        description="A shard is written in parts of this many samples, each published with a completion record: "
                    "a killed shard resumes after its last complete part, so a kill costs at most one part.",
    )


class Config(_Section):
    teacher: TeacherConfig = Field(description="The teacher model.")
    dataset: DatasetConfig = Field(description="The text to run the teacher over.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="What is stored per token.")
    output: OutputConfig = Field(description="Where the cache goes and how big it may be.")
    run: RunConfig = Field(default_factory=RunConfig, description="How the work is split.")

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data with secrets masked: safe for logs, artifacts and file attributes."""
        data = self.model_dump(mode="json")
        data["output"]["storage_options"] = mask_secrets(data["output"]["storage_options"])
        return data

    def content_key(self) -> str:
        """A short hash of everything that determines the cache's content (not where it is written)."""
        data = self.model_dump(mode="json")
        del data["output"], data["run"]
        data["teacher"] = {k: data["teacher"][k] for k in ("model", "revision")}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _partial(model: type[BaseModel], name: str) -> type[BaseModel]:
    """The same keys, types and descriptions with every field optional: the shape of an override."""
    fields: dict[str, Any] = {}
    for key, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _partial(annotation, f"{annotation.__name__.removesuffix('Config')}Overrides")
        fields[key] = (annotation | None, Field(None, description=field.description))
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


class _SeedDataset(_Section):
    max_samples: int | None = Field(None, description="Alias of dataset.max_samples.")


class _SeedAlias(_Section):
    dataset: _SeedDataset | None = None


# The Prefect flow's `overrides` parameter: nested like Config, every key optional and documented, so the UI's
# "Custom run" form shows each field with its description. Plus the seed's distillation.dataset.max_samples.
ConfigOverrides = create_model(
    "ConfigOverrides",
    __base__=_partial(Config, "_ConfigOverridesBase"),
    distillation=(_SeedAlias | None, Field(None, description="Seed form: distillation.dataset.max_samples.")),
)


_SECRET_WORDS = ("key", "secret", "token", "password", "auth", "credential")


def mask_secrets(options: Any) -> Any:
    """Replace the value of any key that looks like a credential with '***', recursively."""
    if isinstance(options, dict):
        return {
            k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else mask_secrets(v)
            for k, v in options.items()
        }
    if isinstance(options, list):
        return [mask_secrets(v) for v in options]
    return options


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def read_profile(profile: str) -> dict[str, Any]:
    """A profile by name (profiles/NAME.yaml) or by path to a YAML file, as a nested dict."""
    path = Path(profile)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PROFILES_DIR / f"{profile}.yaml"
        if not path.exists():
            raise ConfigError(
                f"profile: no profile named {profile!r}. "
                f"Use one of {', '.join(available_profiles())} or a path to a YAML file."
            )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"profile: {path} is not valid YAML ({e}). Fix the file and run again.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"profile: {path} must be a mapping of sections (teacher:, dataset:, ...).")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['dataset.max_samples=10', 'output.max_bytes=null'] -> nested dict. VALUE is parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. dataset.max_samples=1000.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: take it as the literal string
        _set_dotted(nested, KEY_ALIASES.get(key, key), value)
    return nested


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {dotted}: {part} is a value, not a section.")
    target[leaf] = value


def _normalise_aliases(overrides: dict[str, Any]) -> dict[str, Any]:
    """Accept the seed's nested form {'distillation': {'dataset': {'max_samples': N}}} too."""
    overrides = copy.deepcopy(overrides)
    seed = overrides.pop("distillation", None)
    if seed is not None:
        max_samples = (seed.get("dataset") or {}).get("max_samples") if isinstance(seed, dict) else None
        if max_samples is None or set(seed) != {"dataset"} or set(seed["dataset"]) != {"max_samples"}:
            raise ConfigError(
                "distillation: only distillation.dataset.max_samples is accepted (an alias of "
                "dataset.max_samples). Use the sections teacher, dataset, cache, output, run."
            )
        overrides.setdefault("dataset", {})["max_samples"] = max_samples
    return overrides


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides win; a None override removes the key so that the default applies ('null unsets')."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(profile: str, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Profile + overrides -> a validated Config, or a ConfigError that names the key and the fix."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = deep_merge(read_profile(profile), _normalise_aliases(overrides or {}))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key.{_did_you_mean(err['loc'])}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required, set it in the profile or as {key}=VALUE.")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r}).")
    if len(lines) == 1:  # the usual case: one line that names the key
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = list(model.model_fields)
    prefix = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
    where = f"{prefix}." if prefix else ""
    if close:
        return f" Did you mean {where}{close[0]}? Known keys: {', '.join(known)}."
    return f" Known keys here: {', '.join(known)}."
