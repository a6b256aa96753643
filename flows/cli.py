"""kd-cache command line: run, estimate, validate, plan, inspect, verify, export.

Config errors are one clear message and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from kd_core import guards, hub
from kd_core.config import available_profiles, load_config
from kd_core.demo import resolve_demo_paths
from kd_core.errors import ConfigError, KDCacheError

log = logging.getLogger("kd_cache.cli")

EXAMPLES = """\
examples:
  kd-cache run --profile demo                              # the offline demo: tiny teacher, stdlib docstrings
  kd-cache estimate --profile medium --json                # size and GPU hours of 1M samples (reads the hub)
  kd-cache run --profile small dataset.max_samples=5000 output.uri=s3://bucket/kd/run1
  kd-cache plan --profile large --json                     # which rows each of 512 shards reads
  kd-cache inspect ./out/demo                              # summarise the latest cache under an output.uri
  kd-cache verify ./out/demo --samples 8                   # recompute the teacher on 8 samples and compare
  kd-cache export s3://bucket/kd/run1 one.h5               # the latest version as one self-contained file

overrides are KEY=VALUE with VALUE parsed as YAML 1.2 (null unsets), e.g. cache.top_k=32 dataset.streaming=true;
the seed's form distillation.KEY=VALUE works too. Credentials never go here: set them in the environment.
"""


DEFAULT_PROFILE = "demo"
# The seed's users pick a config the Hydra way, `distillation=medium`: that override names the profile.
PROFILE_OVERRIDE = "distillation"


def _profile(value: str) -> str:
    """A profile name as is; a YAML file as an absolute path, so the flow finds it whatever its directory."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") and path.is_file() else value


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, type=_profile,
                        help=f"profile name in profiles/ or a path to a YAML file (default: {DEFAULT_PROFILE}; "
                             "the seed's distillation=NAME works too)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. dataset.max_samples=1000")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kd-cache", description="Cache a teacher LM's top-k log-probabilities over a dataset, for distillation.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (a local Prefect flow; no server needed)")
    _config_args(p)
    p = sub.add_parser("estimate", help="print size, teacher FLOPs and GPU hours without running the teacher "
                                        "(always, whether it fits or not)")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (upper_bound_bytes, expected_bytes, ...)")
    p = sub.add_parser("validate", help="every check run makes before loading the teacher, size limits included")
    _config_args(p)
    p = sub.add_parser("plan", help="print the shard plan (rows per shard, source rows each decodes) without running")
    _config_args(p)
    p.add_argument("--json", action="store_true", help='print {"method", "source_rows", "rows_read", "shards": '
                                                        '[{"index", "start", "stop", "rows_read"}, ...]}')
    uri_help = "an output.uri (its latest version), a version directory or a cache.h5; a local path or any fsspec URL"

    def storage_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                            metavar="KEY=VALUE", help="an fsspec option for a remote URI, parsed like an override "
                            "(repeatable), e.g. endpoint_url=http://127.0.0.1:9000 or client_kwargs.region_name=eu; "
                            "never credentials: those come from the environment or ~/.aws")
    p = sub.add_parser("inspect", help="summarise a cache: counts, size, provenance, its part files and index")
    p.add_argument("uri", help=uri_help)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--deep", action="store_true",
                   help="read every file whole and check its size and sha256 against the manifest (exit 2 if damaged)")
    storage_option(p)
    p = sub.add_parser("verify", help="recompute the teacher on random samples of a cache and compare")
    p.add_argument("uri", help=uri_help)
    p.add_argument("--samples", type=_positive_int, default=8, help="how many random samples to check (default: 8)")
    p.add_argument("--teacher", metavar="MODEL", help="the teacher to recompute with (hub id or local directory); "
                                                     "default: the one the cache names")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the teacher's repository run its own code; never taken from the cache file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float32", action="store_true",
                   help="compare with the teacher in float32 at fp16-rounding tolerances even when the cache was "
                        "made in bf16/fp16 (by default such a cache is compared with the teacher in its own dtype)")
    storage_option(p)
    p = sub.add_parser("export", help="write a cache as one self-contained HDF5 file (compressed chunks copied)")
    p.add_argument("uri", help=uri_help)
    p.add_argument("out", help="the file to write, e.g. one.h5")
    storage_option(p)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of samples, at least 1 (got {text!r})")
    return value


def _pick_profile(args) -> None:
    """args.profile from --profile or the seed's `distillation=NAME` (taken out of the overrides), else the default."""
    picks = [o for o in args.overrides if o.partition("=")[0].strip() == PROFILE_OVERRIDE]
    args.overrides = [o for o in args.overrides if o not in picks]
    names = {_profile(o.partition("=")[2].strip()) for o in picks}
    if len(names) > 1 or (names and args.profile is not None and names != {args.profile}):
        given = ", ".join(sorted(names | ({args.profile} if args.profile else set())))
        raise ConfigError(f"{PROFILE_OVERRIDE}=NAME picks the profile, like --profile NAME; this command names "
                          f"several ({given}). Fix: give one profile, e.g. --profile {sorted(names)[0]}.")
    if names:
        (name,) = names
        if name not in available_profiles() and not Path(name).is_file():
            raise ConfigError(f"{PROFILE_OVERRIDE}={name}: no profile named {name!r}. Fix: --profile NAME with one of "
                              f"{', '.join(available_profiles())}, or a path to a .yaml file.")
        args.profile = name
    args.profile = args.profile or DEFAULT_PROFILE


def _checked_config(args, teacher: bool = True):
    """The command's config, checked in this process before anything slow starts (a Prefect server, a download):
    the profile, unknown keys and the max_samples guard (instant), then one question to the hub per hub id it names
    (offline, a missing or a gated repository is one line, in seconds)."""
    _pick_profile(args)
    config = load_config(args.profile, args.overrides)
    guards.check_config(config)
    config = resolve_demo_paths(config)  # @demo/NAME: the demo's own files (built on first use), never the hub
    hub.check_reachable(config, teacher=teacher)
    return config


def _read_secret(name: str):
    """output.credentials: the Prefect Secret block, read through Prefect (imported only when a config names one)."""
    from tasks.validate_config import read_secret_block

    if _SERVER is not None:
        _SERVER.wait_ready()

    return read_secret_block(name)


def cmd_run(args) -> int:
    from kd_core.build import validate

    # Checked before the server starts, so a bad config is one clean message in about a second (and credentials
    # passed as overrides are refused before any flow run records them); the flow's first task checks again.
    _checked_config(args)
    with contextlib.ExitStack() as stack:
        server = _start_local_server(stack)
        # The target, the teacher's config, the imports of the flow: seconds, beside the server's start.
        build = validate(args.profile, args.overrides, read_secret=_read_secret)
        from flows.build_teacher_cache import build_teacher_cache

        if server is not None:
            _warm_imports(build.config)
            server.wait_ready()
            log.info("temporary Prefect server ready %.1f s after its start", server.ready_after)
        result = build_teacher_cache(profile=args.profile, overrides=args.overrides)
    root = build.store.root
    if result.get("up_to_date"):
        print(f"up to date: {root} already holds this cache (key {result['key']}); no teacher work was done.")
    else:
        print(f"wrote {result['uri']}: {result['num_samples']:,} samples, {result['num_tokens']:,} tokens, "
              f"{result['bytes_per_token']:.1f} B/token, in {result['wall_seconds']:,.1f} s")
    print(f"next: kd-cache inspect {root}                # counts, size, provenance\n"
          f"      kd-cache verify {root} --samples 8     # recompute the teacher on 8 samples and compare")
    return 0


_SERVER = None  # the temporary server this command started, if any


def _warm_imports(config) -> None:
    """Import now, while the server starts in its own process, what the flow's tasks would import after it: the
    datasets library and the teacher's model class (seconds each; docs/PERFORMANCE.md, "Fixed cost")."""
    import datasets  # noqa: F401 - imported for the side effect of having it loaded

    from kd_core.teacher import teacher_num_parameters

    teacher_num_parameters(config.teacher)  # imports the model's module (transformers' Llama: torch._dynamo, 5 s)


def _start_local_server(stack: contextlib.ExitStack):
    """With no Prefect server configured, a local run talks to a temporary one (flows/local_server.py), started
    before Prefect is even imported, so that its start-up overlaps the rest of the checks; it is stopped when
    `stack` closes. None when the settings name a server (the environment, profiles.toml, .env, prefect.toml)."""
    global _SERVER
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # it would log "Failed to send telemetry"
    if os.environ.get("PREFECT_API_URL"):
        return None
    from flows.local_server import TemporaryServer

    server = TemporaryServer()
    stack.callback(server.stop)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        server.stop()
        return None
    # Prefect read its settings at import: this process's client gets the address through them, subprocesses
    # through the environment.
    stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
    os.environ["PREFECT_API_URL"] = server.api_url
    stack.callback(_drain_prefect_workers)  # before the server stops (the stack unwinds last in, first out)
    _SERVER = server
    return server


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues, while the server is up: once it is gone, each would be retried
    against a closed port (a minute of "Error logging to API" at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def cmd_estimate(args) -> int:
    """The numbers, always (a cache that would not fit included: `fits` says so and why); exit 0."""
    from kd_core.build import validate
    from kd_core.estimate import estimate

    _checked_config(args)
    est = estimate(validate(args.profile, args.overrides, check_target=False, read_secret=_read_secret), check=False)
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        _print_rows(est.rows())
    return 0


def cmd_validate(args) -> int:
    """Every check `run` makes before the teacher loads, the size limits included."""
    from kd_core.build import validate
    from kd_core.estimate import check_space, estimate

    _checked_config(args)
    build = validate(args.profile, args.overrides, read_secret=_read_secret)
    est = estimate(build, check=False)
    print(json.dumps(build.config.public_dict(), indent=2))
    _print_rows(est.rows())
    check_space(build, est)
    print(f"config OK (cache key {build.key})")
    return 0


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def cmd_plan(args) -> int:
    from kd_core import data

    config = _checked_config(args, teacher=False)  # the dataset is all a plan needs: no output target, no teacher
    summary = data.plan(config.dataset, config.run.num_shards).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = summary["rows_read"]
    samples = summary["shards"][-1]["stop"]
    print(f"{len(summary['shards'])} shards over {samples:,} samples, planned by {summary['method']}: "
          f"{rows:,} source rows read in all ({rows / max(1, samples):.3f} per sample)")
    print(f"{'index':>6} {'start':>12} {'stop':>12} {'rows_read':>12}")
    for shard in summary["shards"]:
        print(f"{shard['index']:>6} {shard['start']:>12,} {shard['stop']:>12,} {shard['rows_read']:>12,}")
    return 0


def _options(args) -> dict | None:
    """--storage-option KEY=VALUE ... as fsspec options (None when none were given)."""
    from kd_core.config import parse_storage_options

    return parse_storage_options(args.storage_options) or None


def cmd_inspect(args) -> int:
    from kd_core.h5cache import CacheReader
    from kd_core.storage import human_bytes

    from kd_core.errors import CacheFileError

    with CacheReader(args.uri, _options(args)) as reader:
        info, manifest = reader.info(), reader.source.manifest
        # Every file's size and metadata (nothing outside the cache, its build id); --deep: every byte's sha256.
        if damage := reader.damage(deep=args.deep):
            more = f" (and {len(damage) - 1} more damaged files)" if len(damage) > 1 else ""
            raise CacheFileError(f"{damage[0].rstrip('.')}{more}. Fix: run the build again: a damaged version is "
                                 "rebuilt.")
        reader[len(reader) - 1]  # reads data, not only metadata: a damaged last part shows here
        distinct = _distinct_ids(reader) if info.samples is not None else None
    if args.json:
        print(json.dumps({**info.__dict__, "mode": info.mode, "bytes_per_token": info.bytes_per_token,
                          "distinct_ids_per_row": distinct,
                          "manifest": manifest.model_dump(mode="json") if manifest else None}, indent=2, default=str))
        return 0
    attrs = info.attrs
    rows = f"top_k {info.top_k}" if info.samples is None else f"sampled, {info.samples} draws per row"
    print(f"cache       {info.path}")
    print(f"samples     {info.num_samples:,}   tokens {info.num_tokens:,}   {rows}   vocab {info.vocab_size:,}")
    if distinct:
        print(f"distinct    ids per row (in {distinct['samples_read']} samples): mean {distinct['mean']:.1f}, "
              f"p10 {distinct['p10']:.0f}, p50 {distinct['p50']:.0f}, p90 {distinct['p90']:.0f}, max {distinct['max']}")
    if info.file_bytes:
        print(f"size        {human_bytes(info.file_bytes)} ({info.bytes_per_token:.1f} B/token)")
    print(f"teacher     {attrs.get('teacher_model')} @ {attrs.get('teacher_revision', 'default')}")
    print(f"dataset     {attrs.get('dataset_name')} {attrs.get('dataset_config', '')} split={attrs.get('dataset_split')}")
    print(f"max_length  {attrs.get('max_length')}   format v{attrs.get('format_version')}   {attrs.get('producer')}")
    if manifest is None:
        print(f"layout      one self-contained file ({reader.source.index_uri})")
        return 0
    print(f"index       {manifest.index.name}  {human_bytes(manifest.index.bytes)}  "
          f"({100 * manifest.index.bytes / manifest.file_bytes:.2f}% of the version)")
    print(f"parts       {len(manifest.parts)} files, largest {human_bytes(max(p.bytes for p in manifest.parts))}")
    for part in manifest.parts:
        print(f"  {part.name}  {human_bytes(part.bytes):>9}  {part.num_samples:,} samples  {part.num_tokens:,} tokens")
    return 0


def cmd_export(args) -> int:
    from kd_core.h5cache import export_cache
    from kd_core.storage import human_bytes

    done = export_cache(args.uri, args.out, _options(args))
    print(f"wrote {args.out}: {done['num_samples']:,} samples, {done['num_tokens']:,} tokens; "
          f"{human_bytes(done['bytes'])} copied in {done['seconds']:.1f} s ({done['bytes'] / 1e6 / done['seconds']:.0f} MB/s)")
    return 0


def _distinct_ids(reader, most: int = 200) -> dict:
    """Distinct ids per row of a sampled cache, from up to `most` samples spread over it."""
    import numpy as np

    picks = np.unique(np.linspace(0, len(reader) - 1, min(most, len(reader))).astype(int))
    m = np.concatenate([(reader[int(i)]["sampled_counts"] > 0).sum(-1) for i in picks])
    p10, p50, p90 = np.percentile(m, [10, 50, 90])
    return {"samples_read": len(picks), "mean": float(m.mean()), "p10": p10, "p50": p50, "p90": p90,
            "max": int(m.max())}


# Tolerances when a cache made in half precision is checked against the teacher in that same precision:
# bf16 kernels vary with batch shape (measured up to 0.033 in log-prob on a 1B teacher, docs/PERFORMANCE.md).
HALF_PRECISION_TOLERANCES = {"rtol": 1e-2, "atol": 5e-2, "lse_tol": 5e-2, "draw_tol": 5e-2}


def cmd_verify(args) -> int:
    import random

    import torch

    from kd_core.h5cache import CacheReader
    from kd_core.teacher import load_teacher
    from kd_core.verify import teacher_to_verify, verify_rows

    with CacheReader(args.uri, _options(args)) as reader:
        # A cache is someone else's data: it may name a teacher, never whether that teacher's code may run.
        teacher_cfg = teacher_to_verify(reader.attrs, model=args.teacher, trust_remote_code=args.trust_remote_code)
        made_in = reader.attrs.get("teacher_dtype", "float32")
        picks = sorted(random.Random(args.seed).sample(range(len(reader)), min(args.samples, len(reader))))
        rows = [reader[i] for i in picks]
    if args.float32 or made_in == "float32":
        dtype, tolerances = "float32", {}
    else:
        dtype, tolerances = made_in, HALF_PRECISION_TOLERANCES
    named = "given by --teacher" if args.teacher else "named by the cache; --teacher MODEL to use another"
    print(f"loading teacher {teacher_cfg.model} @ {teacher_cfg.revision or 'default revision'} ({named}), "
          f"trust_remote_code={teacher_cfg.trust_remote_code}", flush=True)
    teacher = load_teacher(teacher_cfg.model_copy(update={"dtype": dtype}))
    report = verify_rows(teacher, rows, top_k=reader.top_k, draws=reader.samples, dtype=getattr(torch, dtype),
                         **tolerances)
    print(f"checked {report.samples} samples ({report.positions:,} positions) of a cache made in {made_in} "
          f"against the teacher recomputed alone in {dtype} (output layer in float64)")
    if report.fit is None:
        print(f"  max logsumexp error    {report.max_logsumexp_error:.2e}  (tolerance {report.lse_tol:g})")
        print(f"  max log-prob error     {report.max_logprob_error:.2e}  ({report.logprob_outliers} beyond "
              f"{report.rtol:g}*|x| + {report.atol:g})")
        print(f"  top-k set mismatches   {report.topk_mismatches}")
    else:
        print(f"  rows with bad counts   {report.layout_errors}  (counts must sum to {reader.samples}, ids ascending)")
        print(f"  impossible draws       {report.impossible_draws}  (ids the teacher gives p < 1e-9)")
        print(f"  rows not redrawn       {report.draw_mismatches}  (the seeded draws again from the teacher; "
              f"flips within {report.draw_tol:g} in log-prob allowed)")
        print(f"  draws vs the teacher   chi-square {report.fit.statistic:.1f} on {report.fit.dof} dof over "
              f"{report.fit.draws:,} draws, p = {report.fit.p_value:.3g} (fails below {report.alpha:g})")
    print("OK" if report.ok else "MISMATCH: this cache does not match the teacher")
    return 0 if report.ok else 1


class StderrHandler(logging.StreamHandler):
    """Logs to sys.stderr as it is when each record is written, not as it was when logging was set up: a caller that
    swaps stderr (pytest's capsys, a redirect in a notebook) and closes the old one would otherwise get
    "--- Logging error ---" blocks in place of every later log line."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):  # StreamHandler.__init__ and setStream assign it; the current sys.stderr always wins
        pass


COMMANDS = {"run": cmd_run, "estimate": cmd_estimate, "validate": cmd_validate, "plan": cmd_plan,
            "inspect": cmd_inspect, "verify": cmd_verify, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Hugging Face's own bars (weights loading, dataset files) would interleave with the shard's progress line.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # A no-op where logging is already set up (by Prefect, or by a program that calls main()).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[StderrHandler()])
    # One line per Prefect API or hub call (huggingface_hub uses httpx2), per block fsspec fetches, otherwise.
    for name in ("httpx", "httpx2", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KDCacheError as e:
        print(f"kd-cache {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `kd-cache inspect --json | head`: the reader has what it wanted
        # Python flushes stdout again at exit and would print a second BrokenPipeError: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command stopped by SIGPIPE (`yes | head`)


def entry() -> None:
    """The `kd-cache` command. After `run` the process ends at once: its work is closed and published, the logs are
    sent and the server stopped, and the interpreter's own teardown of torch, transformers and Prefect would add
    2-3 s to every run (docs/PERFORMANCE.md). Other commands exit normally."""
    code = main()
    if sys.argv[1:2] == ["run"]:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
