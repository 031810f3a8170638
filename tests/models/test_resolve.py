"""Model resolution: local folders, a fake but exactly laid-out offline hub cache, and the weights choice."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError

from kolite.errors import ModelFormatError, ModelNotFound
from kolite.models import resolve as resolve_mod
from kolite.models.gpt2_keys import gpt2_weights
from kolite.models.gpt2config import GPT2Config
from kolite.models.resolve import (
    CONVERSION_PR_TITLE,
    WeightsChoice,
    choose_weights,
    hub_offline,
    resolve_model,
)
from kolite.models.synthetic import random_state_dict, write_checkpoint
from kolite.models.weights import load_state_dict

CFG = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, eos_token_id=1)
REPO = "skt/kogpt2-base-v2"
MAIN = "a" * 40  # commit hashes: 40 hex digits, as huggingface_hub expects
OTHER = "b" * 40
PR_COMMIT = "c" * 40
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}"}


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def checkpoint_files(tmp: Path, *, bin_if_torch: bool = True) -> dict[str, bytes]:
    """config + tokenizer + weights as KoGPT2 ships them: pytorch_model.bin (safetensors without torch)."""
    folder = write_checkpoint(tmp / "src", CFG, extra_files=TOKENIZER_FILES)
    if bin_if_torch and have_torch():
        import torch

        sd = {k: torch.from_numpy(v) for k, v in random_state_dict(CFG).items()}
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def put_in_hub_cache(
    cache: Path,
    repo_id: str,
    files: dict[str, bytes],
    *,
    commit: str = MAIN,
    ref: str | None = "main",
    tree: list[str] | None = None,
) -> Path:
    """Lay files out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<name> → blob, refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        ref_file = repo / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # no trailing newline: huggingface_hub reads it verbatim
    if tree is not None:  # the tree listing snapshot_download caches (trees/<commit>.json)
        listing = {name: {"size": 1, "blob_id": "0" * 40} for name in tree}
        (repo / "trees").mkdir(exist_ok=True)
        (repo / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as a user sets it, and as huggingface_hub would have read it at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# --------------------------------------------------------------------------------------------------
# local folders


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", CFG, extra_files={**TOKENIZER_FILES, "merges.txt": "#"})
    files = resolve_model(str(folder))
    assert files.root == folder and files.revision == "local" and files.repo_id is None
    assert files.name == str(folder.resolve())
    assert files.config == folder / "config.json"
    assert files.weights == folder / "model.safetensors"
    assert files.tokenizer == folder / "tokenizer.json"
    assert files.tokenizer_config == folder / "tokenizer_config.json"
    assert files.merges == folder / "merges.txt" and files.vocab is None


def test_local_folder_with_only_a_bin(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", CFG)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert resolve_model(str(folder)).weights.name == "pytorch_model.bin"


@pytest.mark.parametrize(
    ("remove", "message"), [("config.json", r"config\.json"), ("model.safetensors", "neither")]
)
def test_incomplete_local_folder(tmp_path: Path, remove: str, message: str) -> None:
    folder = write_checkpoint(tmp_path / "m", CFG)
    (folder / remove).unlink()
    with pytest.raises(ModelFormatError, match=message):
        resolve_model(str(folder))


def test_a_weights_file_is_not_a_model_folder(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", CFG)
    with pytest.raises(ModelNotFound, match="is a file"):
        resolve_model(str(folder / "model.safetensors"))


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_folder_is_not_sent_to_the_hub(name: str) -> None:
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(name)


# --------------------------------------------------------------------------------------------------
# the offline hub cache


def test_offline_cache_gives_snapshot_files_and_commit(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "hub"
    snapshot = put_in_hub_cache(cache, REPO, checkpoint_files(tmp_path))
    files = resolve_model(REPO, cache_dir=cache)

    assert files.name == REPO and files.repo_id == REPO and files.revision == MAIN
    assert files.root == snapshot and files.config == snapshot / "config.json"
    assert files.weights.name == ("pytorch_model.bin" if have_torch() else "model.safetensors")
    assert files.tokenizer == snapshot / "tokenizer.json" and files.vocab is None
    cfg = GPT2Config.from_file(files.config)
    weights = gpt2_weights(load_state_dict(files.weights), cfg)  # symlinked blobs read like files
    assert weights.keys() == random_state_dict(CFG).keys()


def test_fake_cache_is_what_huggingface_hub_itself_reads(tmp_path: Path) -> None:
    from huggingface_hub import scan_cache_dir

    cache = tmp_path / "hub"
    files = checkpoint_files(tmp_path, bin_if_torch=False)
    put_in_hub_cache(cache, REPO, files)
    put_in_hub_cache(cache, REPO, {"model.safetensors": files["model.safetensors"]}, commit=PR_COMMIT,
                     ref="refs/pr/7")
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"main", "refs/pr/7"}


def test_offline_cache_from_hf_hub_cache(
    tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, REPO, checkpoint_files(tmp_path, bin_if_torch=False))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    assert resolve_model(REPO).revision == MAIN


def test_local_files_only_needs_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, REPO, checkpoint_files(tmp_path, bin_if_torch=False))
    assert not hub_offline()
    assert resolve_model(REPO, cache_dir=cache, local_files_only=True).revision == MAIN


def test_offline_revision_tag(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "hub"
    files = checkpoint_files(tmp_path, bin_if_torch=False)
    put_in_hub_cache(cache, REPO, files)
    put_in_hub_cache(cache, REPO, files, commit=OTHER, ref="v1")
    assert resolve_model(REPO, cache_dir=cache, revision="v1").revision == OTHER
    assert resolve_model(REPO, cache_dir=cache, revision=MAIN).revision == MAIN


def test_partial_snapshot_of_a_repo_with_both_weight_files(tmp_path: Path, offline: None) -> None:
    # A pull fetches one weights file, but the cached tree listing names both: huggingface_hub then
    # calls the snapshot incomplete. What is there is enough.
    cache = tmp_path / "hub"
    files = checkpoint_files(tmp_path, bin_if_torch=False)
    put_in_hub_cache(cache, REPO, files, tree=[*files, "pytorch_model.bin", "flax_model.msgpack"])
    assert resolve_model(REPO, cache_dir=cache).weights.name == "model.safetensors"


def test_offline_uses_a_cached_conversion_pr(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "hub"
    files = checkpoint_files(tmp_path, bin_if_torch=False)
    weights = files.pop("model.safetensors")
    put_in_hub_cache(cache, REPO, files)  # the branch: config and tokenizer only were pulled
    pr = put_in_hub_cache(cache, REPO, {"model.safetensors": weights}, commit=PR_COMMIT, ref="refs/pr/7")
    resolved = resolve_model(REPO, cache_dir=cache)
    assert resolved.weights == pr / "model.safetensors"
    assert resolved.revision == MAIN and resolved.config.parent.name == MAIN


@pytest.mark.parametrize("what", ["nothing", "no-weights", "no-config"])
def test_not_in_cache_says_how_to_fix_it(tmp_path: Path, offline: None, what: str) -> None:
    cache = tmp_path / "hub"
    files = checkpoint_files(tmp_path, bin_if_torch=False)
    if what == "no-weights":
        put_in_hub_cache(cache, REPO, {k: v for k, v in files.items() if k != "model.safetensors"})
    elif what == "no-config":
        put_in_hub_cache(cache, REPO, {k: v for k, v in files.items() if k != "config.json"})
    with pytest.raises(ModelNotFound) as err:
        resolve_model(REPO, cache_dir=cache)
    message = str(err.value)
    assert REPO in message and "kolite pull" in message and "folder" in message


def test_hub_offline_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


# --------------------------------------------------------------------------------------------------
# the weights choice (pure)


def pr(num: int, *, author: str = "SFconvertbot", title: str = CONVERSION_PR_TITLE, status: str = "open",
       is_pull_request: bool = True) -> SimpleNamespace:
    """A stand-in for huggingface_hub.Discussion with the fields the choice reads."""
    return SimpleNamespace(num=num, author=author, title=title, status=status,
                           is_pull_request=is_pull_request)


BIN_ONLY = ["config.json", "pytorch_model.bin", "tokenizer.json", "tf_model.h5"]


def never_iterated():
    raise AssertionError("discussions were listed although the repo has safetensors")
    yield


def test_safetensors_on_the_branch_wins_without_listing_discussions() -> None:
    files = [*BIN_ONLY, "model.safetensors"]
    assert choose_weights(files, never_iterated()) == WeightsChoice("model.safetensors")


def test_bin_only_repo_uses_the_bot_conversion_pr() -> None:
    discussions = [pr(9, title="Update README"), pr(4), pr(2)]
    assert choose_weights(BIN_ONLY, discussions) == WeightsChoice("model.safetensors", "refs/pr/4")


@pytest.mark.parametrize(
    "candidate",
    [
        pr(4, author="someone-else"),
        pr(4, status="closed"),
        pr(4, status="merged"),
        pr(4, title="Adding safetensors"),
        pr(4, is_pull_request=False),
    ],
    ids=["other-author", "closed", "merged", "other-title", "discussion"],
)
def test_untrusted_or_stale_prs_are_ignored(candidate: SimpleNamespace) -> None:
    assert choose_weights(BIN_ONLY, [candidate]) == WeightsChoice("pytorch_model.bin")


def test_author_is_compared_case_insensitively() -> None:
    # transformers spells the bot "SFConvertBot"; the hub account is "SFconvertbot".
    assert choose_weights(BIN_ONLY, [pr(3, author="SFConvertBot")]).revision == "refs/pr/3"


def test_pr_converted_from_other_weights_is_skipped() -> None:
    checked: list[int] = []

    def matches(num: int) -> bool:
        checked.append(num)
        return num == 2

    assert choose_weights(BIN_ONLY, [pr(5), pr(2)], pr_matches=matches).revision == "refs/pr/2"
    assert checked == [5, 2]
    assert choose_weights(BIN_ONLY, [pr(5)], pr_matches=lambda n: False) == WeightsChoice("pytorch_model.bin")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["config.json", "tf_model.h5"], "neither"),
        (["config.json", "model.safetensors.index.json"], "sharded"),
    ],
)
def test_no_usable_weights(files: list[str], message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        choose_weights(files, [pr(1)])


# --------------------------------------------------------------------------------------------------
# the online path, against a stand-in for HfApi (the download functions are recorded, not run)


class FakeApi:
    """Answers model_info/get_repo_discussions like the hub would for a .bin-only repo."""

    def __init__(self, trees: dict[str | None, dict[str, str]], discussions: list[SimpleNamespace]) -> None:
        self.trees, self.discussions, self.calls = trees, discussions, []

    def model_info(self, repo_id: str, *, revision: str | None = None, files_metadata: bool = False):
        self.calls.append(("model_info", revision))
        if revision not in self.trees:
            request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
            raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=request))
        siblings = [SimpleNamespace(rfilename=f, blob_id=b) for f, b in self.trees[revision].items()]
        return SimpleNamespace(sha=MAIN, siblings=siblings)

    def get_repo_discussions(self, repo_id: str, **filters):
        self.calls.append(("discussions", filters))
        yield from self.discussions


@pytest.fixture()
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    import huggingface_hub

    calls: list[tuple] = []
    snapshot = tmp_path / "snapshots" / MAIN

    def snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot", kwargs["revision"], sorted(kwargs["allow_patterns"])))
        return str(snapshot)

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append(("file", filename, kwargs["revision"]))
        return str(tmp_path / "snapshots" / PR_COMMIT / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


MAIN_TREE = {"config.json": "c1", "pytorch_model.bin": "bin1", "tokenizer.json": "t1", "tf_model.h5": "h5"}


def test_online_bin_repo_downloads_matching_pr_safetensors(downloads: list[tuple]) -> None:
    api = FakeApi({None: MAIN_TREE, "refs/pr/3": {**MAIN_TREE, "model.safetensors": "st"}}, [pr(3)])
    files = resolve_mod._download(api, REPO, None, None, progress=False)
    snapshot_call, file_call = downloads
    assert "pytorch_model.bin" not in snapshot_call[2] and "model.safetensors" not in snapshot_call[2]
    assert {"config.json", "tokenizer.json", "vocab.json", "merges.txt"} <= set(snapshot_call[2])
    assert file_call == ("file", "model.safetensors", "refs/pr/3")
    assert files.weights.parent.name == PR_COMMIT and files.revision == MAIN


def test_online_pr_from_older_weights_falls_back_to_bin(downloads: list[tuple]) -> None:
    converted_from_old = {**MAIN_TREE, "pytorch_model.bin": "old", "model.safetensors": "s"}
    api = FakeApi({None: MAIN_TREE, "refs/pr/3": converted_from_old}, [pr(3)])
    files = resolve_mod._download(api, REPO, None, None, progress=True)
    assert downloads == [("snapshot", None, sorted([*resolve_mod.SUPPORT_FILES, "pytorch_model.bin"]))]
    assert files.weights.name == "pytorch_model.bin"


def test_online_safetensors_repo_never_lists_discussions(downloads: list[tuple]) -> None:
    api = FakeApi({"v2": {**MAIN_TREE, "model.safetensors": "st"}}, [])
    files = resolve_mod._download(api, REPO, "v2", None, progress=False)
    assert [c[0] for c in api.calls] == ["model_info"]
    assert downloads[0][1] == "v2" and files.weights.name == "model.safetensors"


def test_online_unknown_repo_is_model_not_found(downloads: list[tuple]) -> None:
    with pytest.raises(ModelNotFound, match="not a local folder"):
        resolve_mod._download(FakeApi({}, []), "nobody/nothing", None, None, progress=False)
    assert downloads == []


def test_online_repo_without_config_is_a_format_error(downloads: list[tuple]) -> None:
    api = FakeApi({None: {"model.safetensors": "x"}}, [])
    with pytest.raises(ModelFormatError, match=r"no config\.json"):
        resolve_mod._download(api, REPO, None, None, progress=False)


def test_progress_false_silences_huggingface_hub_bars() -> None:
    import logging

    from huggingface_hub.utils.tqdm import _create_progress_bar

    bar = _create_progress_bar(cls=resolve_mod._silent_tqdm(), log_level=logging.INFO,
                               name="huggingface_hub.snapshot_download", total=3)
    assert bar.disable


def test_unreachable_hub_falls_back_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    class NoNetworkApi:
        def model_info(self, repo_id: str, **kwargs):
            raise httpx2.ConnectError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetworkApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, REPO, checkpoint_files(tmp_path, bin_if_torch=False))
    assert resolve_model(REPO, cache_dir=cache).revision == MAIN
    with pytest.raises(ModelNotFound, match=r"could not be reached.*kolite pull"):
        resolve_model("someone/else", cache_dir=cache)
