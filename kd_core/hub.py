"""One quick question to the Hugging Face Hub for each hub id a config names, before datasets or transformers ask.

Offline, those libraries retry for about 30 s and end in a traceback; a missing or gated repository surfaces as a
deep error of theirs. Here each id costs one request (all in parallel, HUB_TIMEOUT_S each) and any failure is one
ConfigError naming the key, the id and the fix. With HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE
for the teacher / the dataset) nothing is asked: the libraries read the local Hugging Face cache, and say so in one
line when it lacks the repository.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from kd_core.config import Config
from kd_core.errors import ConfigError

HUB_TIMEOUT_S = 4.0  # per request; the requests run at once, so a config waits at most about this long

# datasets' packaged builders a dataset.name may be instead of a hub id (datasets.packaged_modules, 5.x).
BUILDERS = frozenset({"arrow", "csv", "json", "pandas", "parquet", "text", "xml", "webdataset", "hdf5", "lance",
                      "iceberg", "vortex", "imagefolder", "audiofolder", "videofolder", "pdffolder"})


@dataclass(frozen=True)
class HubRef:
    key: str            # the config key that names it, e.g. "teacher.model"
    repo_id: str
    repo_type: str      # "model" | "dataset"
    revision: str | None


def is_hub_id(name: str) -> bool:
    """'name' or 'org/name' that is no local directory (how from_pretrained and load_dataset read it)."""
    path = os.path.expanduser(name)
    return not (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "://" in name
                or os.path.exists(path))


def refs(config: Config, teacher: bool = True, dataset: bool = True) -> list[HubRef]:
    """The hub ids the config names (a local teacher directory or a file builder names none)."""
    found = []
    if teacher and is_hub_id(config.teacher.model):
        found.append(HubRef("teacher.model", config.teacher.model, "model", config.teacher.revision))
    name = config.dataset.name
    if dataset and name not in BUILDERS and is_hub_id(name):
        found.append(HubRef("dataset.name", name, "dataset", config.dataset.revision))
    return found


def check_reachable(config: Config, teacher: bool = True, dataset: bool = True) -> None:
    """ConfigError (one line: the key, the id, why, the fix) unless the hub answers for every id the config names."""
    from huggingface_hub import constants

    # Offline modes: the hub's own, and the one transformers or datasets each honour for their kind of repository.
    offline = {"model": _flag("TRANSFORMERS_OFFLINE"), "dataset": _flag("HF_DATASETS_OFFLINE")}
    wanted = [r for r in refs(config, teacher, dataset) if not offline[r.repo_type]]
    if not wanted or constants.is_offline_mode():
        return
    answers: dict[int, str | None] = {}

    def ask(i: int, ref: HubRef) -> None:
        try:
            answers[i] = _problem(ref)
        except Exception as e:  # noqa: BLE001 - whatever stops the question, the run cannot read the id
            answers[i] = _unreachable(ref, type(e).__name__)

    # Daemon threads: a hanging name lookup is bounded by no request timeout and must not hold the process at exit.
    threads = [threading.Thread(target=ask, args=(i, ref), daemon=True) for i, ref in enumerate(wanted)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 2 * HUB_TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for i, ref in enumerate(wanted):
        if i not in answers:
            raise ConfigError(_unreachable(ref, f"no answer in {2 * HUB_TIMEOUT_S:.0f} s"))
        if answers[i]:
            raise ConfigError(answers[i])


def _flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def _problem(ref: HubRef) -> str | None:
    """Why the hub cannot serve `ref` (with the fix), or None."""
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where, local = f"{ref.key}: {ref.repo_id!r}", _local(ref)
    try:
        HfApi().repo_info(ref.repo_id, revision=ref.revision, repo_type=ref.repo_type, timeout=HUB_TIMEOUT_S)
        return None
    except RevisionNotFoundError:
        rev_key = ref.key.split(".")[0] + ".revision"
        return f"{rev_key}: {ref.repo_id!r} has no revision {ref.revision!r} on the hub. Fix: {rev_key}=main, a tag or a commit sha."
    except GatedRepoError:
        return (f"{where} is gated on the hub: accept its terms on huggingface.co and set HF_TOKEN in the environment "
                "(never in the config).")
    except RepositoryNotFoundError:
        return (f"{where} is not a {ref.repo_type} on the hub, or it is private and needs a token. Fix the name, set "
                f"HF_TOKEN in the environment (never in the config), or use {local}.")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return (f"{where}: the hub ({constants.ENDPOINT}) refused access (HTTP {status}). Fix: set HF_TOKEN in the "
                    f"environment (never in the config) to a token that may read it, or use {local}.")
        if status == 404:
            return (f"{where} was not found on the hub ({constants.ENDPOINT}, HTTP 404). Fix the name, or use "
                    f"{local}.")
        return _unreachable(ref, f"HTTP {status}")
    except (httpx.HTTPError, OSError) as e:
        return _unreachable(ref, type(e).__name__)


def _local(ref: HubRef) -> str:
    """What to name instead of a hub id."""
    if ref.repo_type == "model":
        return "a local directory (teacher.model=/path/to/model)"
    return "local files (dataset.name=parquet dataset.data_files=/path/*.parquet)"


def _unreachable(ref: HubRef, why: str) -> str:
    from huggingface_hub import constants

    local = _local(ref)
    return (f"{ref.key}: cannot reach the Hugging Face Hub ({constants.ENDPOINT}: {why}) to read {ref.repo_id!r}. "
            f"Fix: use {local}, or set HF_HUB_OFFLINE=1 if the Hugging Face cache already holds it, or run with "
            "network access.")
