"""What ``python -m verify`` checks before any heavy import (torch, transformers) and before loading weights: the
check names asked for, the numbers, where the repo is (a folder, or a Hub id through huggingface_hub and its cache)
and that it is a VipLlava repo at all, so a wrong folder is refused in a second instead of being loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

#: The names of the checks, in the order they run. ``verify.checks.ALL_CHECKS`` pairs each with its function (a
#: test asserts the two agree); this copy exists so the command line can list and validate names without torch.
CHECK_NAMES = (
    "files",
    "mapping",
    "strict_load",
    "resize",
    "processor",
    "tokenizer_era",
    "chat_template",
    "logits",
    "generation",
)
MANIFEST = "conversion.json"
ARCHITECTURE = "VipLlavaForConditionalGeneration"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


class VerifyUsageError(Exception):
    """Bad usage or unreadable input (exit 2), as opposed to a failed check (exit 1). Names in the message come
    from files: control characters are escaped here so the message stays one line."""

    def __init__(self, message: object = "") -> None:
        from convert.safejson import clean

        super().__init__(clean(message))


def check_only(only) -> list[str] | None:
    """``None`` (every check) or a non-empty list of known check names, duplicates dropped, in the given order."""
    if only is None:
        return None
    names = ", ".join(CHECK_NAMES)
    if isinstance(only, str) or not all(isinstance(n, str) for n in only):
        raise VerifyUsageError(f"only={only!r}: expected a list of check names ({names})")
    unknown = [n for n in only if n not in CHECK_NAMES]
    if unknown:
        raise VerifyUsageError(f"--only {unknown[0]}: no such check; the checks are {names}")
    if not only:
        raise VerifyUsageError(
            f"--only: no check named; a report with zero checks proves nothing (the checks are {names})"
        )
    return list(dict.fromkeys(only))


def check_max_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise VerifyUsageError(f"--max-new-tokens {n!r}: expected a whole number >= 1 (the greedy tokens to compare)")
    return n


def check_source(value: str | None, flag: str) -> None:
    """A local path that exists, or something that reads as a Hub id (resolved later, through the cache)."""
    if value is None or Path(value).expanduser().exists() or _HUB_ID.match(value):
        return
    raise VerifyUsageError(f"{flag} {value!r}: no such file or folder, and not a Hub id (owner/name[@revision])")


def resolve_repo(repo: str | Path) -> tuple[Path, str | None]:
    """(local folder, resolved commit or None): a folder as is; ``owner/name[@revision]`` from the Hugging Face
    cache (downloaded when online; ``HF_HUB_OFFLINE=1`` is honoured)."""
    text = str(repo)
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise VerifyUsageError(f"{text}: is a file; pass the repo folder (or a Hub id owner/name[@revision])")
        return p, None
    if not _HUB_ID.match(text):
        raise VerifyUsageError(f"{text}: not a folder (no such path), and not a Hub id (owner/name[@revision])")
    repo_id, _, revision = text.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(repo_id, revision=revision or None))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else str(e).splitlines()[0][:160]
        raise VerifyUsageError(
            f"{text}: not in the local Hugging Face cache ({why}); download it once with network "
            "access, or pass a folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise VerifyUsageError(f"{text}: could not fetch from the Hub ({str(e).splitlines()[0][:200]})") from None
    commit = local.name if re.fullmatch(r"[0-9a-f]{40}", local.name) else None
    return local, commit


def check_vipllava_repo(folder: Path) -> dict:
    """The repo's ``config.json`` if it describes a VipLlava model; otherwise a one-line refusal, before any weight
    is read (a plain Llama folder would otherwise be loaded whole)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise VerifyUsageError(f"{cfg_path}: missing; pass a Hugging Face VipLlava repo (a folder with config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerifyUsageError(f"{cfg_path}: unreadable ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(cfg, dict):
        raise VerifyUsageError(f"{cfg_path}: expected a JSON object")
    model_type, arch = cfg.get("model_type"), cfg.get("architectures")
    if model_type != "vipllava" or (
        arch is not None and ARCHITECTURE not in (arch if isinstance(arch, list) else [arch])
    ):
        hint = (
            "this is an ORIGINAL ViP-LLaVA checkpoint: convert it first (python -m convert --original ...)"
            if model_type in ("llava_llama", "llava_phi3", "llava_phi")
            else "pass a converted VipLlava repo"
        )
        raise VerifyUsageError(
            f"{cfg_path}: model_type {model_type!r}, architectures {arch!r}; expected model_type 'vipllava' "
            f"and {ARCHITECTURE}; {hint}"
        )
    return cfg


def audit_inputs_problem(folder: Path, original, text_model, vision_model) -> str | None:
    """A repo without conversion.json (not written by this tool, or its record removed) is audited: the original
    inputs cannot be read from a record, so they must all be given."""
    if (folder / MANIFEST).is_file():
        return None
    missing = [
        f
        for f, v in (("--original", original), ("--text-model", text_model), ("--vision-model", vision_model))
        if not v
    ]
    if missing:
        return (
            f"{folder}: no {MANIFEST} (a repo this tool did not write): auditing it needs the original inputs; "
            f"pass {', '.join(missing)}"
        )
    return None
