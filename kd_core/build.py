"""validate-config: a profile plus overrides become one Build, resolved once; every later step takes the Build.

    validate(profile, overrides) -> Build   the max_samples guard first, then every check that needs no data
    check(config)                -> Build   the same checks on a loaded Config
    accept(params)               -> Build   a deployed shard: the parent's Build.params(), checked under this
                                            worker's policy, refused when this worker resolves another key

Then, each taking the Build: kd_core.estimate (estimate-storage), kd_core.shard (shard-dataset and
teacher-inference), kd_core.merge (merge-to-hdf5); kd_core.store names every path they touch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import ValidationError

import kd_core
from kd_core import guards, io, source
from kd_core.h5cache import FORMAT_VERSION
from kd_core.h5cache.format import SAMPLED_LAYOUT
from kd_core.config import SAMPLER_VERSION, CacheConfig, Config, describe_validation_error, load_config
from kd_core.demo import resolve_demo_paths
from kd_core.errors import ConfigError
from kd_core.source import ResolvedSource
from kd_core.store import Store


@dataclass(frozen=True)
class Rows:
    """What each cache row holds, from the chosen mode: the top_k best ids with their log-probs (mode topk), or
    `samples` draws at temperature 1 as distinct ids and counts (mode sampled). The other setting is None."""

    mode: Literal["topk", "sampled"]
    top_k: int | None
    samples: int | None

    @classmethod
    def of(cls, cache: CacheConfig) -> "Rows":
        if cache.mode == "sampled":
            return cls("sampled", None, cache.samples)
        return cls("topk", cache.top_k, None)

    def teacher_args(self) -> dict[str, Any]:
        """run_teacher's keywords for these rows."""
        return {"mode": "topk", "top_k": self.top_k} if self.samples is None else {"mode": "sampled",
                                                                                   "draws": self.samples}


@dataclass(frozen=True)
class Build:
    """One cache build, resolved once by validate-config.

    config: the checked config, teacher.dtype resolved (auto -> what this machine runs), hub revisions pinned to
    the commits they named at validate time; never credentials.  source: what the build reads, as validate
    resolved it (kd_core.source: files with fingerprints, commit shas).  key: the version key, version_key(config,
    source).  rows: the chosen mode's row layout.  store: output.uri's layout.
    """

    config: Config
    source: ResolvedSource
    key: str
    rows: Rows
    store: Store

    @classmethod
    def of(cls, config: Config, source: ResolvedSource) -> "Build":
        """The Build of a config whose teacher.dtype is resolved and revisions pinned (check() does both)."""
        return cls(config=config, source=source, key=version_key(config, source.digest()), rows=Rows.of(config.cache),
                   store=Store(config.output.uri, config.output.storage_options))

    def params(self) -> dict[str, Any]:
        """The Build as a deployed shard's flow-run parameter (JSON). No credentials: Config refuses them (they
        come from output.credentials or the worker's environment); teacher.dtype is already resolved. The source
        travels resolved: a shard checks its own files against it rather than resolving every file again."""
        return {"config": self.config.model_dump(mode="json"), "key": self.key,
                "source": self.source.model_dump(mode="json")}


def version_key(config: Config, source_digest: str) -> str:
    """A short hash of everything that determines the cache's bytes (not where it is written): the teacher, its
    revision and resolved dtype, the dataset, the source as resolved (ResolvedSource.digest(): the teacher's and
    dataset's commits, every data file's size and fingerprint), the cache settings of the chosen mode, the format
    and the producer's version. teacher.dtype=auto is resolved as on this machine; check() records the resolution
    in the Build's config, and a deployed parent hands that to its shards, so every worker of one build computes
    one key. Always 16 hex digits (store.is_key)."""
    data = config.model_dump(mode="json")
    del data["output"], data["run"]
    data["teacher"] = {k: data["teacher"][k] for k in ("model", "revision")}
    # Only the keys that change the bytes: a top-k cache's key is what it was before sampled mode existed.
    if data["cache"]["mode"] == "topk":
        del data["cache"]["mode"], data["cache"]["samples"]
    else:
        del data["cache"]["top_k"]
        data["cache"]["sampler"] = SAMPLER_VERSION
        data["cache"]["layout"] = SAMPLED_LAYOUT
    from kd_core.teacher import resolve_dtype  # torch, imported only when a build is resolved

    data["teacher"]["dtype"] = resolve_dtype(config.teacher)
    data["format_version"], data["producer"] = FORMAT_VERSION, kd_core.__version__
    data["source"] = source_digest
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def validate(profile: str, overrides: dict[str, Any] | list[str] | None = None, check_target: bool = True,
             deployed: bool = False, read_secret: Callable[[str], Any] | None = None) -> Build:
    """Load and check the config. The max_samples guard runs before anything is loaded or written; the worker's
    policy (guards.check_policy; stricter for a `deployed` run) before any file the run names is read.
    check_target=False skips the output target (`kd-cache estimate` needs no bucket to exist).

    read_secret(name) returns the value of the Prefect Secret block named by output.credentials: the flow and
    command-line layers pass it (kd_core imports no Prefect). The credentials go to io.use_credentials, never
    into the config.
    """
    guards.check_profile(profile, deployed)
    return check(load_config(profile, overrides), check_target, deployed, read_secret)


def check(config: Config, check_target: bool = True, deployed: bool = False,
          read_secret: Callable[[str], Any] | None = None, resolved: ResolvedSource | None = None) -> Build:
    """Every check validate makes, on a loaded config; its Build. The source is resolved here (kd_core.source:
    listings, footers and hub lookups, no data read) unless `resolved` is given (a shard gets its parent's)."""
    from kd_core.teacher import resolve_dtype, teacher_vocab_size  # torch: seconds, only once a build is checked

    guards.check_config(config)
    # `@demo/NAME` -> the demo's assets (built on first use, ~40 s), after the guard: what is checked, planned and
    # keyed names the real files. A no-op for a deployed parent's config (resolved by its own check).
    config = resolve_demo_paths(config)
    guards.check_policy(config, deployed)
    if config.output.credentials is not None:
        io.use_credentials(config.output.uri, _credentials(config, read_secret))
    # Resolved once, here: the key covers the dtype, and every shard of a build must run in the same one.
    teacher = config.teacher.model_copy(update={"dtype": resolve_dtype(config.teacher)})
    config = config.model_copy(deep=True, update={"teacher": teacher})
    if check_target:
        io.check_target(config.output.uri, config.output.storage_options)  # writable directory / existing bucket
    resolved = resolved if resolved is not None else source.resolve(config)
    config = source.pinned(config, resolved)  # every shard loads what was resolved, even if `main` moves meanwhile
    guards.check_vocab(config, teacher_vocab_size(config.teacher))  # reads the teacher's config file, no weights
    return Build.of(config, resolved)


def _credentials(config: Config, read_secret: Callable[[str], Any] | None) -> dict[str, Any]:
    """The fsspec options held by the Secret block named by output.credentials (a JSON object)."""
    name = config.output.credentials
    if read_secret is None:
        raise ConfigError(f"output.credentials: the Secret block {name!r} can only be read by a Prefect flow run or "
                          "the kd-cache command; this caller passed no reader.")
    value = read_secret(name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not value:  # never quote the value: it is a secret
        raise ConfigError(f"output.credentials: the Secret block {name!r} must hold a JSON object of fsspec options, "
                          'e.g. {"key": "...", "secret": "..."} for S3.')
    return value


def accept(params: dict[str, Any], read_secret: Callable[[str], Any] | None = None) -> Build:
    """The parent's Build (Build.params()) as this worker resolves it: checked under this worker's policy for
    deployed runs, and refused when this worker resolves it to another version key (another kd-cache checkout or
    other teacher files would write other bytes)."""
    try:
        build = check(Config.model_validate(params["config"]), deployed=True, read_secret=read_secret,
                      resolved=ResolvedSource.model_validate(params["source"]) if "source" in params else None)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None
    if build.key != params["key"]:
        raise ConfigError(
            f"version key: this worker resolves the parent's config to {build.key}, the parent to "
            f"{params['key']}: its kd-cache checkout ({kd_core.__version__}) or teacher files differ from the "
            "parent's. Fix: deploy the same kd-cache version and teacher files on every worker."
        )
    return build
