"""The recording Hub stand-in: the few ``HfApi`` methods publishing uses, recorded, never touching the network.

Passed as ``api=`` to ``publish.publish`` or as ``hub_api=`` to ``convert.cli.main`` by ``tests/test_publish.py``
and by ``bench/push.py``; one class for both, so the tests and the benchmark exercise the same boundary.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import HfHubHTTPError


def _sha256(path: Path) -> str:
    """sha256 of a file in 16 MiB chunks (a 5 GB shard is never held in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()


def _http_error(status: int, url: str) -> HfHubHTTPError:
    # HfHubHTTPError needs a response of the HTTP library huggingface_hub uses (httpx2 for hub 2.x): find it from
    # the error's own base class rather than naming the library
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    response = http.Response(status, request=http.Request("POST", url))
    return HfHubHTTPError(
        f"{status} Client Error: Unauthorized for url: {url}\nInvalid credentials in Authorization header",
        response=response,
    )


class RecordingHubApi:
    """The network boundary's stand-in: the few ``HfApi`` methods publishing uses, recorded, never touching the
    network. ``create_commit`` records, per operation, the path in the repo and the sha256 of its content AT CALL
    TIME (read from the file it points to, or the bytes given), the deleted paths, and the text of the card and
    the report. ``remote_files``: what the target branch already holds. ``fail_at``: the method that raises
    ``HfHubHTTPError`` (401). ``existing_public``: the repo already exists as a public repo."""

    def __init__(
        self, fail_at: str | None = None, existing_public: bool = False, remote_files: list[str] | None = None
    ):
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        self.fail_at = fail_at
        self.existing_public = existing_public
        self.remote_files = remote_files if remote_files is not None else [".gitattributes"]
        self._private: bool | None = None

    def _record(self, name: str, **kwargs) -> None:
        self.calls.append((name, kwargs))
        if name == self.fail_at:
            raise _http_error(401, f"https://huggingface.co/api/{name}")

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        self._record("create_repo", repo_id=repo_id, private=private, exist_ok=exist_ok, **kw)
        self._private = False if self.existing_public else bool(private)
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kw):
        self._record("repo_info", repo_id=repo_id, **kw)
        return SimpleNamespace(id=repo_id, private=self._private)

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kw):
        self._record("create_branch", repo_id=repo_id, branch=branch, exist_ok=exist_ok, **kw)

    def list_repo_files(self, repo_id, *, revision=None, **kw):
        self._record("list_repo_files", repo_id=repo_id, revision=revision, **kw)
        return list(self.remote_files)

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, revision=None, **kw):
        operations = list(operations)
        self._record(
            "create_commit",
            repo_id=repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            **kw,
        )
        added, texts, deleted = {}, {}, []
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                deleted.append(op.path_in_repo)
                continue
            assert isinstance(op, CommitOperationAdd), op
            src = op.path_or_fileobj
            assert op.path_in_repo not in added, f"{op.path_in_repo} added twice"
            added[op.path_in_repo] = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else _sha256(Path(src))
            if op.path_in_repo in ("README.md", "verification.json"):
                texts[op.path_in_repo] = (src if isinstance(src, bytes) else Path(src).read_bytes()).decode()
        self.commits.append({"files": added, "texts": texts, "deleted": deleted})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{'f' * 40}", oid="f" * 40)

    def __getattr__(self, name):  # any other Hub call is a test failure, not a silent no-op
        raise AssertionError(f"unexpected Hub call: {name}")
