"""A hub id or a local folder → the files kolite needs, downloading only those (never the whole repo).

Hub repos often hold TF/Flax/ONNX copies too; `allow_patterns` keeps a Pi from fetching gigabytes it will not
use. Weights prefer `model.safetensors`; for .bin-only repos such as skt/kogpt2-base-v2 the safetensors
conversion pull request (opened by the hub's SFconvertbot, found the way transformers finds it) is used when
it matches the current weights, else the .bin is read by kolite's torch-free restricted unpickler.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kolite.errors import HubUnreachable, ModelFormatError, ModelNotFound
from kolite.models.checkpoint import SAFETENSORS_NAME, SHARDED_MESSAGE, TORCH_BIN_NAME, WEIGHT_FILES, weights_in_folder
from kolite.models.tokenizer_config import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE

log = logging.getLogger(__name__)

SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json", "vocab.json", "merges.txt", CHAT_TEMPLATE_FILE,
)
# What transformers' safetensors_conversion.py looks for; the bot's hub account is spelled "SFconvertbot"
# (transformers compares "SFConvertBot"), so the author is compared case-insensitively.
CONVERSION_PR_TITLE = "Adding `safetensors` variant of this model"
CONVERSION_BOT = "sfconvertbot"
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are on disk, and which exact revision they came from (for cache keys)."""

    name: str
    root: Path
    config: Path
    weights: Path
    tokenizer: Path | None
    vocab: Path | None
    merges: Path | None
    tokenizer_config: Path | None
    chat_template: Path | None  # chat_template.jinja
    revision: str  # "local" for folders, else the snapshot's commit hash
    repo_id: str | None

    @property
    def has_tokenizer(self) -> bool:
        """Serving needs a tokenizer: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
        return self.tokenizer is not None or (self.vocab is not None and self.merges is not None)

    def check_tokenizer(self) -> None:
        if not self.has_tokenizer:
            raise ModelFormatError(
                f"{self.name} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt")


@dataclass(frozen=True)
class WeightsChoice:
    """Which weights file to fetch; `revision` is a PR ref when it comes from the conversion PR."""

    filename: str
    revision: str | None = None


class DiscussionLike(Protocol):
    """The fields of `huggingface_hub.Discussion` the choice reads (tests pass plain objects)."""

    title: str
    status: str
    num: int
    author: str
    is_pull_request: bool


# ----------------------------------------------------------------------------------------------------
# pure choice


def is_conversion_pr(d: DiscussionLike) -> bool:
    """An open PR by the conversion bot with its fixed title: other authors could push arbitrary weights."""
    return (
        bool(d.is_pull_request)
        and d.status == "open"
        and d.title == CONVERSION_PR_TITLE
        and str(d.author).lower() == CONVERSION_BOT
    )


def choose_weights(
    repo_files: Iterable[str],
    discussions: Iterable[DiscussionLike] = (),
    *,
    pr_matches: Callable[[int], bool] = lambda num: True,
) -> WeightsChoice:
    """safetensors on the branch, else a matching conversion PR's safetensors, else the .bin.

    `discussions` is consumed lazily and only for .bin-only repos, so passing the hub's paginated iterator
    costs nothing for repos that already have safetensors. `pr_matches(num)` confirms a candidate PR was
    converted from the same weights the branch holds now.
    """
    files = set(repo_files)
    if SAFETENSORS_NAME in files:
        return WeightsChoice(SAFETENSORS_NAME)
    if TORCH_BIN_NAME in files:
        for d in discussions:
            if is_conversion_pr(d) and pr_matches(d.num):
                return WeightsChoice(SAFETENSORS_NAME, f"refs/pr/{d.num}")
        return WeightsChoice(TORCH_BIN_NAME)
    if any(f.endswith(".index.json") for f in files):
        raise ModelFormatError(SHARDED_MESSAGE)
    raise ModelFormatError(f"the repo has neither {SAFETENSORS_NAME} nor {TORCH_BIN_NAME} (PyTorch weights)")


# ----------------------------------------------------------------------------------------------------
# entry point


def resolve_model(
    name: str,
    *,
    revision: str | None = None,
    cache_dir: Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> ModelFiles:
    """A folder on disk is used as is; anything else is a hub id, fetched (or found in the cache offline)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _local_files(folder)
    if folder.exists():
        raise ModelNotFound(f"{name!r} is a file; pass the folder that holds config.json and the weights")
    if _looks_like_path(name):
        raise ModelNotFound(f"model folder {name!r} does not exist")
    if local_files_only or hub_offline():
        return _cached_files(name, revision, cache_dir)
    return _hub_files(name, revision, cache_dir, progress)


def public_name(model: str) -> str:
    """The name a model is shown by: a hub id as it is, a local folder by its folder name only (an
    absolute path would tell every client where the server's files live)."""
    path = Path(model).expanduser()
    if _looks_like_path(model) or path.is_dir():
        return path.resolve().name or model
    return model


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in _TRUE


def _looks_like_path(name: str) -> bool:
    """Hub ids are `org/name` or `name`; anything else that is missing was meant as a folder."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _local_files(folder: Path) -> ModelFiles:
    if not (folder / "config.json").is_file():
        raise ModelFormatError(f"{folder} has no config.json; it is not a transformers model folder")
    weights = weights_in_folder(folder)
    # The absolute path names a folder model: "./m" and "/home/me/m" share one converted-graph cache entry.
    return _model_files(str(folder.resolve()), folder, weights, revision="local", repo_id=None)


def _model_files(name: str, root: Path, weights: Path, *, revision: str, repo_id: str | None) -> ModelFiles:
    def opt(filename: str) -> Path | None:
        return root / filename if (root / filename).is_file() else None

    return ModelFiles(
        name=name, root=root, config=root / "config.json", weights=weights,
        tokenizer=opt("tokenizer.json"), vocab=opt("vocab.json"), merges=opt("merges.txt"),
        tokenizer_config=opt(TOKENIZER_CONFIG_FILE), chat_template=opt(CHAT_TEMPLATE_FILE), revision=revision,
        repo_id=repo_id,
    )


# ----------------------------------------------------------------------------------------------------
# offline: the hub cache


def _cached_files(repo_id: str, revision: str | None, cache_dir: Path | None) -> ModelFiles:
    """Pick from what an earlier `kolite pull` left in the cache, in the order the online choice would."""
    snapshot = _cached_snapshot(repo_id, revision, cache_dir)
    if not (snapshot / "config.json").is_file():
        raise ModelNotFound(_not_cached(repo_id, revision, "its config.json is not in the cache"))
    weights = _cached_weights(repo_id, snapshot, cache_dir)
    if weights is None:
        raise ModelNotFound(_not_cached(repo_id, revision, "its weights are not in the cache"))
    return _model_files(repo_id, snapshot, weights, revision=snapshot.name, repo_id=repo_id)


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
            allow_patterns=[*SUPPORT_FILES, *WEIGHT_FILES],
        ))
    except IncompleteSnapshotError as exc:
        # Expected: the repo lists both weight files but a pull fetches only one of them.
        return Path(exc.snapshot_path)
    except LocalEntryNotFoundError:
        raise ModelNotFound(_not_cached(repo_id, revision, "it is not in the hub cache")) from None
    except HFValidationError as exc:
        raise ModelNotFound(f"{repo_id!r} is neither a folder nor a valid hub id: {exc}") from None


def _cached_weights(repo_id: str, snapshot: Path, cache_dir: Path | None) -> Path | None:
    """The branch's own files first: a cached conversion PR may predate newer weights on the branch."""
    for filename in WEIGHT_FILES:
        if (snapshot / filename).is_file():
            return snapshot / filename
    from huggingface_hub import try_to_load_from_cache

    for num in _cached_pr_numbers(repo_id, cache_dir):
        found = try_to_load_from_cache(repo_id, SAFETENSORS_NAME, cache_dir=cache_dir, revision=f"refs/pr/{num}")
        if isinstance(found, str):
            return Path(found)
    return None


def _cached_pr_numbers(repo_id: str, cache_dir: Path | None) -> list[int]:
    """PR refs in the cache (`refs/refs/pr/<n>`, written when a PR revision is downloaded), newest first."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    pr_refs = root / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / "refs" / "pr"
    if not pr_refs.is_dir():
        return []
    return sorted((int(p.name) for p in pr_refs.iterdir() if p.name.isdigit()), reverse=True)


def _not_cached(repo_id: str, revision: str | None, why: str) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"model {repo_id!r}{rev} cannot be used offline: {why}. Run `kolite pull {repo_id}` once with a "
        "network connection (HF_HUB_OFFLINE unset), or pass a local model folder instead."
    )


# ----------------------------------------------------------------------------------------------------
# online: the hub


def _network_errors() -> tuple[type[BaseException], ...]:
    """Failures that mean "no network" rather than "no such model": fall back to the cache for these."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x speaks httpx2, 1.x httpx
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _hub_files(repo_id: str, revision: str | None, cache_dir: Path | None, progress: bool) -> ModelFiles:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return _download(HfApi(), repo_id, revision, cache_dir, progress)
    except (ModelNotFound, ModelFormatError):
        raise
    except (*_network_errors(), HfHubHTTPError) as exc:
        log.warning("cannot reach the hub for %s (%s); looking in the local cache", repo_id, exc)
        try:
            return _cached_files(repo_id, revision, cache_dir)
        except ModelNotFound as missing:
            raise HubUnreachable(f"the hub could not be reached ({exc}); {missing}") from exc


def _download(
    api: Any, repo_id: str, revision: str | None, cache_dir: Path | None, progress: bool
) -> ModelFiles:
    """List the branch once, choose the weights, then fetch exactly the files needed."""
    from huggingface_hub import hf_hub_download, snapshot_download

    blobs = _repo_blobs(api, repo_id, revision)
    if "config.json" not in blobs:
        raise ModelFormatError(f"{repo_id} has no config.json; it is not a transformers model repo")
    choice = choose_weights(
        blobs, _conversion_prs(api, repo_id),
        pr_matches=lambda num: _pr_has_same_weights(api, repo_id, num, blobs.get(TORCH_BIN_NAME)),
    )
    tqdm_class = None if progress else _silent_tqdm()
    weights_pattern = [choice.filename] if choice.revision is None else []
    snapshot = Path(snapshot_download(
        repo_id, revision=revision, cache_dir=cache_dir, tqdm_class=tqdm_class,
        allow_patterns=[*SUPPORT_FILES, *weights_pattern],
    ))
    if choice.revision is None:
        weights = snapshot / choice.filename
    else:
        log.info("%s: using %s from the safetensors conversion PR %s", repo_id, SAFETENSORS_NAME, choice.revision)
        weights = Path(hf_hub_download(
            repo_id, SAFETENSORS_NAME, revision=choice.revision, cache_dir=cache_dir, tqdm_class=tqdm_class,
        ))
    return _model_files(repo_id, snapshot, weights, revision=snapshot.name, repo_id=repo_id)


def _repo_blobs(api: Any, repo_id: str, revision: str | None) -> dict[str, str | None]:
    """filename → git blob id at the revision (blob ids let a PR's .bin be compared with the branch's)."""
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except RevisionNotFoundError:
        raise ModelNotFound(f"{repo_id} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:  # also gated/private repos without a token
        raise ModelNotFound(
            f"{repo_id!r} is not a local folder and not a hub model you can access "
            "(check the spelling; private or gated models need `hf auth login`)"
        ) from None
    except HFValidationError as exc:
        raise ModelNotFound(f"{repo_id!r} is neither a folder nor a valid hub id: {exc}") from None
    return {s.rfilename: s.blob_id for s in info.siblings or []}


def _conversion_prs(api: Any, repo_id: str) -> Iterator[Any]:
    """Open PRs, lazily; a repo with discussions disabled simply has none."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield from api.get_repo_discussions(repo_id, discussion_type="pull_request", discussion_status="open")
    except HfHubHTTPError as exc:
        log.info("%s: cannot list pull requests (%s); using %s", repo_id, exc, TORCH_BIN_NAME)


def _pr_has_same_weights(api: Any, repo_id: str, num: int, branch_bin: str | None) -> bool:
    """The PR adds safetensors on top of the .bin it converted: same .bin blob → same weights.

    transformers requires the PR's parent to be today's head commit; comparing the .bin blob is as strict
    about the weights and survives later README-only commits.
    """
    from huggingface_hub.errors import HfHubHTTPError

    if branch_bin is None:
        return False
    try:
        pr = _repo_blobs(api, repo_id, f"refs/pr/{num}")
    except (HfHubHTTPError, ModelNotFound) as exc:
        log.info("%s: cannot inspect PR %d (%s)", repo_id, num, exc)
        return False
    return SAFETENSORS_NAME in pr and pr.get(TORCH_BIN_NAME) == branch_bin


def _silent_tqdm() -> type:
    """huggingface_hub's tqdm, always disabled: per call, without flipping its process-wide switch."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class SilentTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm

