"""Build a Hugging Face cache on disk the way huggingface_hub lays it out (blobs, snapshots, refs), so tests run
the real huggingface_hub resolution code with HF_HUB_OFFLINE=1. LFS files (weights) are stored under their sha256,
like the Hub's LFS etag; small files under a 40-hex git blob id."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LFS_SUFFIXES = (".bin", ".safetensors", ".model")


def populate(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 39 + "1") -> Path:
    """Copy ``folder`` into ``cache`` as snapshot ``commit`` of model repo ``repo_id`` (refs/main -> commit)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        if f.suffix in LFS_SUFFIXES:
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        os.symlink(Path("..") / ".." / "blobs" / blob, snap / f.name)
    return snap
