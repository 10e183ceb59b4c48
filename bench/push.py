"""``python -m convert ... --push-to-hub`` end to end at full size, through the recording Hub stand-in of
``tests/recording_hub.py`` (nothing leaves the machine).

    python -m bench.push --json OUT.json -- <python -m convert arguments, without --push-to-hub>

Runs the converter's CLI in this process with ``--push-to-hub someone/vip-llava-bench`` and the stand-in passed as
``convert.cli.main(..., hub_api=...)``: conversion, the full default verification the push gate runs, the
model card and the commit. The stand-in is ``tests.recording_hub.RecordingHubApi``, the one the publishing tests
use; it hashes each committed file in 16 MiB chunks (a 5 GB shard never counts as 5 GB of this process's memory).
The JSON says what the commit held and whether every pushed file's sha256 is the one the
folder's manifest records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ID = "someone/vip-llava-bench"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("convert_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    conv_args = [a for a in args.convert_args if a != "--"]

    from convert.cli import main as convert_main
    from tests.recording_hub import RecordingHubApi

    api = RecordingHubApi()
    t = time.perf_counter()
    code = convert_main([*conv_args, "--push-to-hub", REPO_ID], hub_api=api)
    seconds = time.perf_counter() - t
    out_dir = Path(conv_args[conv_args.index("--output") + 1])
    result: dict = {
        "exit": code,
        "seconds": round(seconds, 1),
        "calls": [name for name, _ in api.calls],
        "commits": len(api.commits),
    }
    if api.commits:
        commit = api.commits[0]
        manifest = json.loads((out_dir / "conversion.json").read_text())
        outputs = manifest["outputs"]
        pushed = commit["files"]
        result["files_pushed"] = len(pushed)
        result["bytes_pushed"] = sum((out_dir / n).stat().st_size for n in pushed if (out_dir / n).is_file())
        result["hashes_match_manifest"] = all(pushed.get(n) == d for n, d in outputs.items())
        result["extra_files"] = sorted(set(pushed) - set(outputs))
        report = json.loads(commit["texts"].get("verification.json", "{}") or "{}")
        result["verification"] = {
            "passed": report.get("passed"),
            "dtype": (report.get("settings") or {}).get("dtype"),
            "prompts": len((report.get("settings") or {}).get("prompts") or []),
            "checks": {c["name"]: [c["status"], round(c.get("seconds", 0), 1)] for c in report.get("checks", [])},
        }
    args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
