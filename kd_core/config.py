"""The one config model, and how a profile plus overrides becomes a Config.

A run's config is a YAML profile (profiles/NAME.yaml, or a path to any YAML file) with overrides on top.
Overrides are `KEY=VALUE` strings, the same from the command line and from the Prefect flow's `overrides`
parameter (VALUE is a strict YAML 1.2 scalar: `yes` is a string, `010` is 10, `null` unsets). Every key is
also accepted under the seed system's `distillation.` prefix. Unknown keys are refused with a "did you mean";
credentials are refused (run parameters are stored by Prefect and shown in its UI). Python callers (tests)
may pass a nested dict instead of strings.

Types are checked here; values that need a longer explanation (the max_samples guard, ranges) are checked in
kd_core.guards so that the messages live in one place.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator,
                      model_validator)
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from kd_core import io
from kd_core.errors import ConfigError

# The shipped profiles: profiles/ in a checkout, kd_core/profiles/ in an installed copy (pyproject.toml maps one to
# the other), so a profile name works from any directory.
_HERE = Path(__file__).resolve().parent
PROFILES_DIR = _HERE / "profiles" if (_HERE / "profiles").is_dir() else _HERE.parent / "profiles"

# The seed system put every key under `distillation.`: `distillation.dataset.streaming=true` is
# `dataset.streaming=true`. The one place that knows about aliases.
SEED_PREFIX = "distillation."

# Values of the demo profile that name its offline assets (kd_core.demo builds them on first use).
DEMO_PREFIX = "@demo/"

# YAML 1.2 (ruamel's pure safe loader): `yes`/`on` are strings, `010` is 10, not YAML 1.1's octal 8.
_YAML = YAML(typ="safe", pure=True)

# Bump when kd_core.sampling draws differently from the same logits (its hash, CDF or layout): the version key of
# a sampled cache changes with it, so old and new draws are never mixed in one version.
SAMPLER_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # resolved once (kd_core.build), then only read


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
    trust_remote_code: StrictBool = Field(False, description="Allow the teacher's repository to run its own code.")
    batch_tokens: StrictInt = Field(16384, description="Token budget of one forward batch (padding included).")


class DatasetConfig(_Section):
    name: str = Field(description="Hub dataset id, or a builder such as parquet, json, text.")
    config: str | None = Field(None, description="Dataset configuration (subset) name.")
    split: str = Field("train", description="Split to read.")
    data_files: str | list[str] | dict[str, Any] | None = Field(
        None, description="Files for a builder such as parquet/json/text (local paths or fsspec URLs)."
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    text_column: str = Field("text", description="Column that holds the text.")
    streaming: StrictBool = Field(False, description="Stream the dataset instead of downloading it first.")
    max_samples: StrictInt | None = Field(
        None, description="Read exactly this many samples (required when streaming)."
    )


class CacheConfig(_Section):
    mode: Literal["topk", "sampled"] = Field(
        "topk", description="topk: each position's top_k log-probs. sampled: cache.samples draws from the teacher "
                            "per position, stored as distinct ids and counts (an unbiased target; docs/FORMAT.md)."
    )
    top_k: StrictInt = Field(64, description="How many of the teacher's most likely next tokens to keep per "
                                             "position (cache.mode=topk).")
    samples: StrictInt = Field(64, description="Draws per position from the teacher at temperature 1 "
                                               "(cache.mode=sampled).")
    max_length: StrictInt = Field(2048, description="Tokens per sample; longer samples are truncated.")


class OutputConfig(_Section):
    uri: str = Field(description="Where the cache goes: a local directory or an fsspec URL (s3://bucket/prefix).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for the target (endpoint_url, profile, client_kwargs). Never credentials: "
                    "those come from the worker's environment or output.credentials.",
    )
    credentials: str | None = Field(
        None, description="Name of a Prefect Secret block holding the target's credentials as a JSON object of "
                          "fsspec options (key, secret, token). Each worker reads it at run time; never recorded.",
    )

    @field_validator("credentials")
    @classmethod
    def _a_block_name(cls, name: str | None) -> str | None:
        # The name is recorded and quoted in messages: a secret pasted here instead of a block's name would leak.
        # Prefect's own rule for block names, which no AWS key or secret (upper case, '/', '+') passes.
        if name is not None and not BLOCK_NAME.fullmatch(name):
            raise ConfigError("output.credentials: not the name of a Prefect Secret block (lowercase letters, digits "
                              "and dashes, e.g. kd-s3); it names the block that holds the credentials, never the "
                              "credentials themselves. The value is not shown.")
        return name
    max_bytes: StrictInt | None = Field(None, description="Refuse a run whose expected cache is larger than this.")
    max_object_bytes: StrictInt = Field(
        4 * 2**30, ge=1 << 16, le=5 * 2**40,
        description="No stored object (part file, index) is larger than this; a part rolls over to a new file "
                    "before it would pass it. At most 5 TiB, S3's limit per object.",
    )
    keep_versions: StrictInt = Field(
        3, ge=0, description="Older complete versions kept beside the latest one; older ones are deleted after "
                             "a new version is published."
    )

    @field_validator("uri")
    @classmethod
    def _one_form(cls, uri: str) -> str:
        # Normalised once, here: the layout, locks, clean-up and messages all derive from this value.
        return io.normalise_uri(uri)


# Prefect's rule for block document names (prefect.types.names): lowercase letters, digits and dashes.
BLOCK_NAME = re.compile(r"[a-z0-9-]+")


class RunConfig(_Section):
    num_shards: StrictInt = Field(1, description="Independent pieces of the dataset, each one teacher-inference run.")
    part_samples: StrictInt = Field(
        10_000, ge=1,
        description="A shard is written in parts of this many samples, each published with a completion record: "
                    "a killed shard resumes after its last complete part, so a kill costs at most one part.",
    )
    shard_restarts: int = Field(
        3, ge=0,
        description="Deployed runs: how many times a shard whose worker died (its run CRASHED, or its lease went "
                    "stale) is re-submitted; it resumes from its finished parts. A shard that FAILED is not.",
    )


CREDENTIALS_GO_HERE = (
    "Give them to the workers instead: their environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE), "
    "~/.aws, or a Prefect Secret block named by output.credentials (docs/DEPLOYMENT.md)."
)


class Config(_Section):
    teacher: TeacherConfig = Field(description="The teacher model.")
    dataset: DatasetConfig = Field(description="The text to run the teacher over.")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="What is stored per token.")
    output: OutputConfig = Field(description="Where the cache goes and how big it may be.")
    run: RunConfig = Field(default_factory=RunConfig, description="How the work is split.")

    @model_validator(mode="after")
    def _no_credentials(self) -> "Config":
        # Profiles and Python callers too, not only overrides: the config is recorded (manifests, attributes,
        # Prefect's task results). A ConfigError, not a ValueError: pydantic would quote the value.
        for section, values in self.model_dump(mode="json").items():
            if where := find_credentials(section, values):
                raise ConfigError(f"{where}: credentials are not accepted in the config: it is recorded (Prefect's "
                                  f"database and UI, manifests, cache attributes); the value is not shown. "
                                  f"{CREDENTIALS_GO_HERE}")
        return self

    @model_validator(mode="after")
    def _snake_case_options(self) -> "Config":
        check_option_keys(self.output.storage_options)  # after _no_credentials: a camelCase secret is refused as one
        return self

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data, safe for logs, artifacts and file attributes: storage options are masked
        except those known to be harmless (an allow-list), and any URL's user and password are dropped."""
        data = self.model_dump(mode="json")
        data["output"]["storage_options"] = mask_options(data["output"]["storage_options"])
        return strip_url_credentials(data)


# Storage options recorded as they are: what an endpoint and its client need, none of it a secret. Everything
# else is recorded as '***' (an allow-list: an option nobody thought of is masked, not leaked; credentials are
# refused outright, find_credentials).
_PUBLIC_OPTIONS = frozenset({
    "endpoint_url", "anon", "profile", "region_name", "client_kwargs", "config_kwargs", "connect_timeout",
    "read_timeout", "retries", "max_attempts", "total_max_attempts", "mode", "use_ssl", "verify", "requester_pays",
    "default_block_size", "default_cache_type", "default_fill_cache", "version_aware", "cache_regions",
    "use_listings_cache", "listings_expiry_time", "s3", "addressing_style", "signature_version",
    "max_pool_connections", "project", "account_name", "consistency",
})
# user:password@ (the password may hold '/': up to the token's last '@'), or user@.
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)(?:[^/@\s:]*:\S*@|[^/@\s:]+@)", re.IGNORECASE)


def check_option_keys(options: dict[str, Any], where: str = "output.storage_options", sep: str = ".") -> None:
    """ConfigError naming the first camelCase key of fsspec's own options (top level and client_kwargs /
    config_kwargs) and its snake_case spelling. fsspec hands an unknown option on to the client, which ignores it:
    `endpointUrl` sends every request to AWS, which reads as "bucket does not exist". Options meant for a server
    (s3_additional_kwargs' ACL, headers) keep their spelling."""
    for key, value in options.items():
        if isinstance(value, dict) and key in ("client_kwargs", "config_kwargs"):
            check_option_keys(value, f"{where}{sep}{key}", ".")
        elif re.search(r"[a-z0-9][A-Z]", str(key)):
            snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", key)).lower()
            raise ConfigError(f"{where}{sep}{key}: fsspec options are snake_case; did you mean {where}{sep}{snake}? "
                              "(an option it does not know is passed to the client and ignored, so the endpoint, "
                              "region or profile you meant would not be used)")


def mask_options(options: Any) -> Any:
    """Storage options as they may be recorded: allow-listed keys kept (recursively), every other value '***'."""
    if isinstance(options, dict):
        return {k: mask_options(v) if k in _PUBLIC_OPTIONS else "***" for k, v in options.items()}
    if isinstance(options, list):
        return [mask_options(v) for v in options]
    return options


def strip_url_credentials(value: Any) -> Any:
    """Every string that is a URL with user:password@ gets '***@' instead, recursively."""
    if isinstance(value, dict):
        return {k: strip_url_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_url_credentials(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\1***@", value)
    return value


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def read_profile(profile: str) -> dict[str, Any]:
    """A profile by name (profiles/NAME.yaml) or by path to a YAML file, as a nested dict."""
    path = Path(profile).expanduser()
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROFILES_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"profile: no profile named {profile!r}. "
                f"Use one of {', '.join(available_profiles())} or a path to an existing .yaml file."
            )
    try:
        data = _YAML.load(path.read_text()) or {}
    except YAMLError as e:
        raise ConfigError(f"profile: {path} is not valid YAML ({e}). Fix the file and run again.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"profile: {path} must be a mapping of sections (teacher:, dataset:, ...).")
    return _canonical_sections(data)


def canonical_key(key: str) -> str:
    """A dotted key as the config knows it: the seed's `distillation.` prefix removed."""
    return key[len(SEED_PREFIX):] if key.startswith(SEED_PREFIX) else key


def _canonical_sections(data: dict[str, Any]) -> dict[str, Any]:
    """The nested form of the seed's prefix: {'distillation': {'dataset': ...}} -> {'dataset': ...}."""
    seed = data.get("distillation")
    if not isinstance(seed, dict):
        return data
    rest = {k: v for k, v in data.items() if k != "distillation"}
    return deep_merge(rest, seed)


def parse_override(item: str) -> tuple[str, Any]:
    """'dataset.max_samples=10' -> ('dataset.max_samples', 10): key without the seed prefix, VALUE as YAML 1.2.

    Error messages name the key, never the value: a value may be a credential pasted by mistake.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
        shown = f" (key {key!r})" if sep and re.fullmatch(r"[\w.\- ]{1,80}", key) else ""
        raise ConfigError(f"override{shown} is not KEY=VALUE with a dotted key; write it like "
                          "dataset.max_samples=1000 (the value is not shown, in case it is a secret).")
    value = _yaml_value(raw)
    key = canonical_key(key)
    _refuse_credentials(key, value)
    return key, value


def _yaml_value(raw: str) -> Any:
    try:
        return _YAML.load(raw) if raw.strip() else ""
    except YAMLError:
        return raw  # not YAML (e.g. an unbalanced bracket): take it as the literal string


def parse_storage_options(items: list[str] | None, where: str = "--storage-option") -> dict[str, Any]:
    """Storage options for reading a cache from the command line: ['endpoint_url=http://x',
    'client_kwargs.region_name=eu'] -> a nested dict, VALUEs parsed like overrides. Credentials are refused (a
    shell's history and the process list keep them) and camelCase keys named with their spelling; no message
    shows a value."""
    nested: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
            raise ConfigError(f"{where}: expected KEY=VALUE, e.g. {where} endpoint_url=http://127.0.0.1:9000 "
                              "(the value is not shown, in case it is a secret).")
        value = _yaml_value(raw)
        if find_credentials(f"output.storage_options.{key}", value):
            raise ConfigError(f"{where} {key}: credentials are not accepted on the command line (a shell's history "
                              "and the process list keep them); the value is not shown. Reading takes them from the "
                              "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or ~/.aws.")
        _set_dotted(nested, key, value)
    check_option_keys(nested, where, " ")
    return nested


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """['dataset.max_samples=10', 'output.max_bytes=null'] -> nested dict; None or [] -> {}."""
    nested: dict[str, Any] = {}
    for item in items or []:
        if not isinstance(item, str):
            raise ConfigError("overrides: each override is a KEY=VALUE string, e.g. \"dataset.max_samples=1000\".")
        _set_dotted(nested, *parse_override(item))
    return nested


def override_strings(nested: dict[str, Any], prefix: str = "") -> list[str]:
    """The inverse of parse_overrides, for Python callers: {'cache': {'top_k': 8}} -> ['cache.top_k=8']."""
    items = []
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            items += override_strings(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML: strings quoted, null unsets
    return items


# Keys of output.storage_options (split on _ . -) that hold credentials.
_CREDENTIAL_PARTS = {"key", "secret", "token", "password", "passwd", "credential", "credentials", "connection",
                     "sas", "auth", "authorization"}
_URL_WITH_PASSWORD = io.URL_WITH_PASSWORD


def _any_case(word: str) -> str:
    """'key' -> '[kK][eE][yY]': JSON-schema patterns have no case-insensitive flag that every client honours."""
    return "".join(f"[{c.lower()}{c.upper()}]" for c in word)


# The same rule as find_credentials, as a JSON-schema `pattern` for one KEY=VALUE override of a flow run: Prefect's
# server checks run parameters against the deployment's schema before it stores them (409 otherwise), so a REST
# or UI run that carries credentials is refused before they reach its database. An item is refused when it sets
# output.storage_options with a credential word anywhere in it (words split at non-letters and camelCase humps:
# secretAccessKey), or holds a URL with a password.
_WORDS = "|".join(_any_case(w) for w in sorted(_CREDENTIAL_PARTS, key=len, reverse=True))
OVERRIDE_WITHOUT_CREDENTIALS = (
    r"^(?!\s*(distillation\.)?output\.storage_options[^a-zA-Z]"
    rf"(.*([^a-zA-Z]|[a-z0-9](?=[A-Z])))?({_WORDS})([^a-z]|$))"
    r"(?!.*[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*:[^@\s]+@)"
)

# The same for the run form's one-line form (KEY=VALUE items separated by whitespace): a line that sets
# output.storage_options refuses a credential word anywhere after it (a YAML value may span items: {a: 1, secret: 2}),
# and quotes are refused (the line is split on whitespace alone).
OVERRIDES_LINE_WITHOUT_CREDENTIALS = (
    r"^(?!([\s\S]*\s)?(distillation\.)?output\.storage_options[^a-zA-Z]"
    rf"([\s\S]*([^a-zA-Z]|[a-z0-9](?=[A-Z])))?({_WORDS})([^a-z]|$))"
    r"(?![\s\S]*[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*:[^@\s]+@)"
    r"[^'\"]*$"
)


def find_credentials(key: str, value: Any) -> str | None:
    """The dotted key of the first credential under `key`: a credential-like storage option, or a URL with a
    password in it; None when there is none."""
    for where, leaf in _walk(key, value):
        humps = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", where.removeprefix("output.storage_options"))
        words = set(re.split(r"[_.\-]", humps.lower()))
        named = where.startswith("output.storage_options") and words & _CREDENTIAL_PARTS
        if named or (isinstance(leaf, str) and _URL_WITH_PASSWORD.search(leaf)):
            return where
    return None


def _refuse_credentials(key: str, value: Any) -> None:
    """Credentials must not be run parameters: Prefect stores parameters in its database and shows them in the UI."""
    if where := find_credentials(key, value):
        raise ConfigError(
            f"{where}: credentials are not accepted as overrides (Prefect stores run parameters in its database "
            f"and shows them in the UI); the value is not shown. {CREDENTIALS_GO_HERE}"
        )


def _walk(key: str, value: Any):
    """(dotted key, leaf value) for every leaf under key."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(f"{key}.{k}", v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(key, v)
    else:
        yield key, value


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {dotted}: {part} is a value, not a section.")
    target[leaf] = value


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


def load_config(profile: str, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Profile + overrides -> a validated Config, or a ConfigError that names the key and the fix.

    overrides: KEY=VALUE strings (the CLI and the flow), or, for Python callers, the same as a nested dict.
    None means none: everything as the profile has it. Values are as given: `@demo/NAME` paths
    (kd_core.demo.resolve_demo_paths) and teacher.dtype=auto (kd_core.teacher.resolve_dtype) are resolved where
    a build is (kd_core.build.check).
    """
    if isinstance(overrides, dict):  # from Python, never stored by Prefect: credentials are the caller's business
        overrides = _canonical_sections(overrides)
    else:
        overrides = parse_overrides(overrides)
    data = deep_merge(read_profile(profile), overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["loc"][:2] == ("dataset", "data_files"):  # one line, not one per member of its union type
            line = ("dataset.data_files: must be a path or URL, a list of them, or a mapping {split: paths} "
                    f"(got {_shown(err['input'] if len(err['loc']) == 3 else None)}).")
            if len(err["loc"]) == 3 and line not in lines:
                lines.append(line)
        elif err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key.{_did_you_mean(err['loc'])}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required, set it in the profile or as {key}=VALUE.")
        elif key.startswith("output.storage_options") or key == "output.credentials":
            lines.append(f"{key}: {err['msg']}.")  # never quote what may be a secret
        else:
            lines.append(f"{key}: {err['msg']} (got {_shown(err.get('input'))}).")
    if len(lines) == 1:  # the usual case: one line that names the key
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _shown(value: Any) -> str:
    """A wrong value as an error quotes it: a scalar with any URL's user:password removed; a list or mapping only
    by its kind (an item of a data_files list may be a URL with a password, or a token)."""
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"a mapping with keys {sorted(map(str, value))[:5]}" if all(
            not find_credentials(str(k), None) for k in value) else "a mapping"
    return repr(strip_url_credentials(value))


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
