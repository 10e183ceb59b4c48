"""Publish a converted repo to the Hugging Face Hub, and only a proven one.

This package sits above both ``convert`` and ``verify`` (it needs the converter's manifest and model card, and the
verifier's full verification): neither of them imports it, so the packages form no cycle. The converter's command
line (``python -m convert --push-to-hub``) calls :func:`preflight` and :func:`run`; see docs/architecture.md, Layers.

:func:`publish` runs the FULL verification on the folder first (``verify.api.verify_repo`` with its default
prompts) and refuses when any check fails: nothing is sent, not even the repo creation. Otherwise it pushes the
folder plus the model card (``README.md``) and the report (``verification.json``) in ONE commit whose message
names the tool version and the verification result; files of the target branch that are not in the folder are
deleted in that same commit (``.gitattributes`` is kept), so the branch holds exactly what was verified.

The local folder is left exactly as the converter wrote it, so ``python -m verify`` keeps passing on it (its files
check fails on any file ``conversion.json`` does not list): the card and the report go up from memory, the
converted files from the folder, each re-hashed against the manifest first.

ONE commit by construction: ``HfApi.create_commit`` with one add operation per file. (``upload_folder`` would be
the obvious call, but with ``hf_xet`` installed huggingface_hub >= 2 may split a large folder into several commits,
"(part N)", the first of which carries the deletions.)

The network boundary is ONE object, the Hub client ``api``, a parameter of :func:`publish`, :func:`run` and
:func:`preflight` (``huggingface_hub.HfApi()`` when not given; ``tests/test_publish.py`` and ``bench/push.py`` pass a
recording stand-in, through ``convert.cli.main(..., hub_api=...)`` for the command line). ``create_repo``,
``repo_info`` (only with ``private``), ``create_branch`` (only with a ``revision`` other than main),
``list_repo_files`` and ``create_commit`` are all that is called on it. The token comes from where ``HfApi`` looks
(``HF_TOKEN``, the stored login).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convert import MANIFEST, __version__
from convert.model_card import model_card

if TYPE_CHECKING:
    from verify.report import Report

TOOL = "vipllava-harness"
CARD = "README.md"
REPORT = "verification.json"


class PublishError(Exception):
    """Pushing failed (HTTP, authentication, network) or could not start; the CLI prints one line, exits 2."""

    exit_code = 2


@dataclass
class PublishResult:
    repo_id: str
    revision: str | None
    pushed: bool
    report: Report
    commit_message: str | None = None
    commit_url: str | None = None
    files: list[str] = field(
        default_factory=list
    )  # the files of the commit (converted + README.md + verification.json)
    deleted: list[str] = field(default_factory=list)  # files of the branch that were not in the folder

    @property
    def refused(self) -> bool:
        return not self.pushed


def commit_message(report) -> str:
    """``Convert ViP-LLaVA with vipllava-harness 0.1.0: verify 8/8 checks passed`` (+ the checks with warnings)."""
    ok = [c for c in report.checks if not c.failed]
    msg = f"Convert ViP-LLaVA with {TOOL} {__version__}: verify {len(ok)}/{len(report.checks)} checks passed"
    warned = [c.name for c in report.checks if c.status == "WARN"]
    return msg + (f" ({', '.join(warned)} with warnings)" if warned else "")


def _report_json(report) -> dict:
    """The report's JSON (it records the environment that produced it)."""
    return json.loads(report.to_json())


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub call raises: ``HfHubHTTPError`` (401, 403, 404, 5xx...), the HTTP library's own
    transport errors (its base class is a base of ``HfHubHTTPError``), and ``OSError`` (no token, offline mode,
    connection refused)."""
    from huggingface_hub.errors import HfHubHTTPError

    transport = tuple(
        b for b in HfHubHTTPError.__mro__[1:] if b.__module__.split(".")[0] in ("httpx", "httpx2", "requests")
    )
    return (HfHubHTTPError, OSError, *transport)


def _operations(folder: Path, manifest: dict, extra: dict[str, bytes]) -> list:
    """One add operation per converted file (read from ``folder``, each re-hashed against the manifest so what
    goes up is what verify passed) and per publication file (from memory): the local folder is never written."""
    from huggingface_hub import CommitOperationAdd

    from convert.sources import sha256_file

    outputs: dict = manifest.get("outputs", {})
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    expected = sorted({*outputs, MANIFEST})
    if names != expected:
        raise PublishError(
            f"{folder}: its files changed since verification (now {len(names)}, conversion.json lists "
            f"{len(expected)}); nothing was pushed"
        )
    # two files at a time: hashlib releases the GIL, and a 7B repo is ~14 GB (1.6 GB/s per core with SHA-NI)
    with ThreadPoolExecutor(max_workers=2) as pool:
        hashed = [n for n in names if n != MANIFEST]
        digests = dict(zip(hashed, pool.map(lambda n: sha256_file(folder / n), hashed), strict=True))
    ops = []
    for name in names:
        if name != MANIFEST and digests[name] != outputs[name]:
            raise PublishError(
                f"{folder / name}: changed since verification (sha256 differs from conversion.json); nothing was pushed"
            )
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)))
    ops += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in sorted(extra.items())]
    return ops


@contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """``progress=False`` (``--quiet``) also silences transformers' own bars (``Loading weights``) while verifying."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    if not enabled:
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            tlog.enable_progress_bar()


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    api: Any | None = None,
    verify: Callable[[Path], Report] | None = None,
    proven_versions: list[str] | None = None,
    progress: bool = False,
) -> PublishResult:
    """Verify ``folder`` and, only if every check passes, push it to ``repo_id`` in one commit.

    ``verify(folder) -> Report`` defaults to the full verification (``verify_repo`` with its default prompts and
    images). ``api``: the Hub client, ``huggingface_hub.HfApi()`` when None (made only once verification passed).
    ``private``: create the repo private (``None``: the Hub's default; an existing repo keeps its visibility, and
    ``True`` on an existing public repo is refused before uploading). ``revision``: the branch to push to, created
    from the default branch when missing. Returns a :class:`PublishResult` (``pushed`` False when verification failed).
    Raises :class:`PublishError` when the folder cannot be verified or the Hub refuses (one-line message)."""
    folder = Path(folder).expanduser().absolute()
    if verify is None:
        from verify.api import verify_repo

        verify = functools.partial(verify_repo, progress=progress)
    from verify.context import VerifyUsageError

    try:
        with _transformers_bars(progress):
            report = verify(folder)
    except VerifyUsageError as e:
        raise PublishError(f"{folder}: cannot be verified ({e}); nothing was pushed") from None
    if not report.passed:
        return PublishResult(repo_id=repo_id, revision=revision, pushed=False, report=report)

    manifest = json.loads((folder / MANIFEST).read_text())
    report_json = _report_json(report)
    message = commit_message(report)
    extra = {
        CARD: model_card(manifest, report_json, proven_versions, repo_id=repo_id).encode(),
        REPORT: (json.dumps(report_json, indent=2, sort_keys=True) + "\n").encode(),
    }
    if progress:
        print(
            f"hashing {len(manifest.get('outputs', {}))} files against {MANIFEST} before the push",
            file=sys.stderr,
            flush=True,
        )
    operations = _operations(folder, manifest, extra)
    files = sorted(op.path_in_repo for op in operations)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    stage = "create_repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private:
            stage = "repo_info"
            if getattr(api.repo_info(repo_id), "private", None) is False:
                raise PublishError(
                    f"{repo_id}: exists and is public, and --private does not change an existing repo's "
                    "visibility; nothing was uploaded (make it private on the Hub, or drop --private)"
                )
        if revision and revision != "main":
            stage = "create_branch"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage = "list_repo_files"
        from huggingface_hub import CommitOperationDelete

        stale = sorted(set(api.list_repo_files(repo_id, revision=revision)) - set(files) - {".gitattributes"})
        stage = "create_commit"
        # ONE commit by construction: upload_folder may split a large folder into several commits ("(part N)")
        info = api.create_commit(
            repo_id,
            [*(CommitOperationDelete(path_in_repo=p) for p in stale), *operations],
            commit_message=message,
            commit_description="\n".join(f"{c.name}: {c.status} {c.summary}" for c in report.checks),
            revision=revision,
        )
    except _hub_errors() as e:
        first = (str(e).splitlines() or [e.__class__.__name__])[0]
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = (
            "check the token (HF_TOKEN or `hf auth login`) and your write access to " + repo_id
            if status in (401, 403) or "token" in first.lower()
            else "check the network and the repo id"
        )
        done = "no commit was made" if stage == "create_commit" else "nothing was uploaded"
        raise PublishError(f"pushing to {repo_id} failed at {stage}: {first}; {hint}; {done}") from None
    return PublishResult(
        repo_id=repo_id,
        revision=revision,
        pushed=True,
        report=report,
        commit_message=message,
        commit_url=getattr(info, "commit_url", None),
        files=files,
        deleted=stale,
    )


def run(
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    progress: bool,
    verify: Callable[[Path], Report] | None = None,
    api: Any | None = None,
) -> int:
    """The CLI step after a successful conversion: 0 pushed, 1 refused (verification failed), 2 push failed.
    ``verify`` and ``api`` as in :func:`publish` (the CLI passes no ``verify``: the full verification)."""
    try:
        result = publish(
            folder, repo_id, private=private or None, revision=revision, progress=progress, verify=verify, api=api
        )
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"error: interrupted before the push completed; the converted folder stays at {folder}", file=sys.stderr)
        return 130
    print(result.report.table())
    if result.refused:
        failed = [c for c in result.report.checks if c.failed]
        print(
            f"error: not pushed to {repo_id}: verification failed ({', '.join(c.name for c in failed)}); nothing was "
            f"sent to the Hub; the converted folder stays at {folder}",
            file=sys.stderr,
        )
        for c in failed:
            more = f" (+{len(c.details) - 1} more)" if len(c.details) > 1 else ""
            print(f"  {c.name}: {c.summary}" + (f"; {c.details[0]}{more}" if c.details else ""), file=sys.stderr)
        return 1
    where = f"{repo_id}@{revision}" if revision else repo_id
    print(f"pushed to {where}: {result.commit_message}" + (f" ({result.commit_url})" if result.commit_url else ""))
    return 0


def preflight(repo_id: str, api: Any | None = None) -> str | None:
    """Before a long conversion: a one-line reason why ``--push-to-hub repo_id`` cannot work, or None. ``api`` as in
    :func:`publish`: offline mode (``HF_HUB_OFFLINE``) is refused only when the real client would be used."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"--push-to-hub {repo_id!r}: not a valid repo id ({str(e).splitlines()[0]})"
    if api is None and constants.HF_HUB_OFFLINE:
        return (
            "--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set; unset it (inputs still come from the cache when "
            "present)"
        )
    return None
