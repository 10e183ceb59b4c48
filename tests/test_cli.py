"""The command lines as a user meets them: a table of bad usages, each with its exit code and its one-line
message, all refused before torch is even imported; then the things that need a real run (umask, Ctrl-C, the
progress bar, the fixture line, the library API's own checks).

The table runs in ONE subprocess (a fresh interpreter, so "torch was not imported" is a real observation): each
row calls the CLI's ``main`` with ``sys.argv[0]`` set as the console script or ``python -m`` would set it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = "files, mapping, strict_load, resize, processor, tokenizer_era, chat_template, logits, generation"


def _env(**extra) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict:
    """Folders the rows refer to: a non-empty folder, a plain Llama model folder (a config and a large weight
    file that must never be read), an ORIGINAL-format folder, a VipLlava folder without conversion.json."""
    root = tmp_path_factory.mktemp("cli")
    (root / "full").mkdir()
    (root / "full" / "x.txt").write_text("x")
    (root / "adir").mkdir()
    llama = root / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with open(llama / "model.safetensors", "wb") as f:  # sparse 8 GiB: loading it is what must not happen
        f.truncate(8 << 30)
    orig = root / "original"
    orig.mkdir()
    (orig / "config.json").write_text(
        json.dumps({"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"]})
    )
    vip = root / "vip"
    vip.mkdir()
    (vip / "config.json").write_text(
        json.dumps({"model_type": "vipllava", "architectures": ["VipLlavaForConditionalGeneration"]})
    )
    (root / "afile").write_text("{}")
    return {
        k: str(v)
        for k, v in {
            "root": root,
            "full": root / "full",
            "adir": root / "adir",
            "llama": llama,
            "original": orig,
            "vip": vip,
            "afile": root / "afile",
        }.items()
    }


# (id, tool, argv0, argv, exit code, what the one line says). ``{name}`` is filled from ``places``.
CASES = [
    ("convert-version", "convert", "python -m", ["--version"], 0, "python -m convert (vipllava-harness) 0.1.0"),
    ("convert-help-name", "convert", "vipllava-convert", ["--help"], 0, "usage: vipllava-convert"),
    ("convert-help-dtype-choices", "convert", "python -m", ["--help"], 0, "{{auto,bfloat16,float16,float32}}"),
    (
        "convert-dtype",
        "convert",
        "python -m",
        ["--dtype", "fp8", "--demo", "{root}/d1"],
        2,
        "--dtype 'fp8': expected one of auto, bfloat16, float16, float32; see python -m convert --help",
    ),
    (
        "convert-backbone",
        "convert",
        "python -m",
        ["--backbone", "mistral", "--demo", "{root}/d1"],
        2,
        "--backbone 'mistral': expected one of auto, vicuna, llama3, phi3",
    ),
    (
        "convert-seed-negative",
        "convert",
        "python -m",
        ["--seed", "-1", "--demo", "{root}/d1"],
        2,
        "--seed -1: expected an integer with 0 <= seed < 2**32",
    ),
    (
        "convert-seed-huge",
        "convert",
        "python -m",
        ["--seed", str(2**32), "--demo", "{root}/d1"],
        2,
        "--seed 4294967296",
    ),
    (
        "convert-seed-text",
        "convert",
        "python -m",
        ["--seed", "abc", "--demo", "{root}/d1"],
        2,
        "--seed 'abc': expected an integer",
    ),
    (
        "convert-shard-zero",
        "convert",
        "python -m",
        ["--max-shard-size", "0", "--demo", "{root}/d1"],
        2,
        "--max-shard-size '0': must be positive",
    ),
    (
        "convert-shard-unit",
        "convert",
        "python -m",
        ["--max-shard-size", "5XB", "--demo", "{root}/d1"],
        2,
        "expected a size like 5GB",
    ),
    (
        "convert-output-not-empty",
        "convert",
        "python -m",
        ["--demo", "{full}"],
        2,
        "exists and is not empty; pass --force",
    ),
    (
        "convert-output-parent-missing",
        "convert",
        "python -m",
        ["--original", "{original}", "--output", "{root}/no/such/out"],
        2,
        "the parent folder of --output does not exist",
    ),
    ("convert-output-is-file", "convert", "python -m", ["--demo", "{afile}"], 2, "exists and is a file"),
    (
        "convert-json-folder-missing",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--json", "{root}/missing/s.json"],
        2,
        "--json {root}/missing/s.json: the folder {root}/missing does not exist",
    ),
    (
        "convert-json-inside-output",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--json", "{root}/d1/s.json"],
        2,
        "inside the output folder, where it would be a file conversion.json does not list",
    ),
    (
        "convert-json-is-folder",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--json", "{adir}"],
        2,
        "is a folder; pass a file name",
    ),
    (
        "convert-demo-and-original",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--original", "{original}"],
        2,
        "--demo DIR converts the bundled fixture into DIR; drop --original",
    ),
    ("convert-nothing", "convert", "python -m", [], 2, "--original and --output required (or --demo DIR)"),
    ("convert-no-output", "convert", "python -m", ["--original", "{original}"], 2, "--output required"),
    (
        "convert-revision-refused",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--revision", "v1"],
        2,
        "--revision v1: ambiguous here (Hub tools read it as the SOURCE revision)",
    ),
    (
        "convert-push-branch-alone",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--push-branch", "v1"],
        2,
        "--private and --push-branch only apply with --push-to-hub",
    ),
    (
        "convert-bad-repo-id",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--push-to-hub", "not a repo"],
        2,
        "not a valid repo id",
    ),
    (
        "convert-output-hub-path-needs-output",
        "convert",
        "python -m",
        ["--original", "{original}", "--output_hub_path", "me/repo"],
        2,
        "the local copy still needs --output DIR",
    ),
    (
        "convert-output-hub-path-offline",
        "convert",
        "python -m",
        ["--demo", "{root}/d1", "--output_hub_path", "me/repo"],
        2,
        "--push-to-hub needs the Hub, but HF_HUB_OFFLINE is set",
    ),
    ("convert-unknown-option", "convert", "python -m", ["--outptu", "x"], 2, "unrecognized arguments: --outptu x"),
    ("verify-version", "verify", "vipllava-verify", ["--version"], 0, "vipllava-verify (vipllava-harness) 0.1.0"),
    ("verify-help-name", "verify", "vipllava-verify", ["--help"], 0, "usage: vipllava-verify"),
    ("verify-help-checks", "verify", "python -m", ["--help"], 0, "run only this check (repeatable); one of files,"),
    (
        "verify-only-unknown",
        "verify",
        "python -m",
        ["{vip}", "--only", "bogus"],
        2,
        "--only 'bogus': expected one of files, mapping, strict_load, resize, processor, tokenizer_era, chat_template, "
        "logits, generation",
    ),
    ("verify-dtype", "verify", "python -m", ["{vip}", "--dtype", "float64"], 2, "--dtype 'float64': expected one of"),
    (
        "verify-tokens-negative",
        "verify",
        "python -m",
        ["{vip}", "--max-new-tokens", "-1"],
        2,
        "--max-new-tokens -1: expected a whole number >= 1",
    ),
    (
        "verify-tokens-zero",
        "verify",
        "python -m",
        ["{vip}", "--max-new-tokens", "0"],
        2,
        "--max-new-tokens 0: expected a whole number >= 1",
    ),
    (
        "verify-json-folder-missing",
        "verify",
        "python -m",
        ["{vip}", "--json", "{root}/missing/r.json"],
        2,
        "--json {root}/missing/r.json: the folder {root}/missing does not exist",
    ),
    (
        "verify-no-such-repo",
        "verify",
        "python -m",
        ["{root}/nope"],
        2,
        "{root}/nope: not a folder (no such path), and not a Hub id",
    ),
    ("verify-repo-is-file", "verify", "python -m", ["{afile}"], 2, "is a file; pass the repo folder"),
    (
        "verify-plain-llama",
        "verify",
        "python -m",
        ["{llama}", "--original", "{original}", "--text-model", "{adir}", "--vision-model", "{adir}"],
        2,
        "{llama}/config.json: model_type 'llama', architectures ['LlamaForCausalLM']; expected model_type 'vipllava'",
    ),
    (
        "verify-original-checkpoint",
        "verify",
        "python -m",
        ["{original}"],
        2,
        "this is an ORIGINAL ViP-LLaVA checkpoint: convert it first",
    ),
    (
        "verify-hub-id-not-cached",
        "verify",
        "python -m",
        ["someone/not-cached@v1"],
        2,
        "someone/not-cached@v1: not in the local Hugging Face cache (HF_HUB_OFFLINE is set)",
    ),
    (
        "verify-audit-needs-inputs",
        "verify",
        "python -m",
        ["{vip}"],
        2,
        "no conversion.json (a repo this tool did not write): auditing it needs the original inputs; pass --original, "
        "--text-model, --vision-model",
    ),
    (
        "verify-original-missing",
        "verify",
        "python -m",
        ["{vip}", "--original", "{root}/nope"],
        2,
        "--original '{root}/nope': no such file or folder",
    ),
    (
        "verify-prompts-missing",
        "verify",
        "python -m",
        ["{vip}", "--prompts", "{root}/nope.json"],
        2,
        "--prompts {root}/nope.json: unreadable",
    ),
    ("verify-no-repo", "verify", "python -m", [], 2, "the following arguments are required: repo"),
]

_RUNNER = r"""
import contextlib, io, json, sys, time
rows, out = json.loads(sys.argv[1]), []
for tool, argv0, argv in rows:
    sys.argv[0] = f"/somewhere/bin/vipllava-{tool}" if argv0.startswith("vipllava") else f"/x/{tool}/__main__.py"
    mod = __import__(f"{tool}.cli", fromlist=["main"])
    err, std = io.StringIO(), io.StringIO()
    t0 = time.process_time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            rc = mod.main(argv)
        except SystemExit as e:  # main() returns argparse's exit codes; this would be a bug
            rc = f"SystemExit({e.code})"
    out.append({"rc": rc, "argparse": "see python -m" in err.getvalue() or "see vipllava-" in err.getvalue(), "err":
    err.getvalue(), "out": std.getvalue(), "cpu_seconds": time.process_time() - t0,
                "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def table(places) -> dict:
    rows = [(tool, argv0, [a.format(**places) for a in argv]) for _, tool, argv0, argv, _, _ in CASES]
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(rows)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=places["root"],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return dict(zip([c[0] for c in CASES], json.loads(done.stdout), strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_table(case, table, places):
    name, tool, argv0, _, code, message = case
    got = table[name]
    message = message.format(**places)
    assert got["rc"] == code, got
    assert not got["torch"] and not got["transformers"], (
        f"{name}: torch/transformers imported before the arguments were checked"
    )
    if code == 2:
        lines = got["err"].splitlines()
        assert len(lines) == 1 and got["out"] == "", f"{name}: usage errors are ONE line on stderr: {got['err']!r}"
        prog = "vipllava-" + tool if argv0.startswith("vipllava") else f"python -m {tool}"
        assert lines[0].startswith("error: ") and message in lines[0], lines[0]
        if got.get("argparse"):  # argparse's own errors point to the help, under the name the user typed
            assert lines[0].endswith(f"; see {prog} --help"), lines[0]
        # no heavy import, no work: milliseconds of CPU (a Hub-cache lookup imports huggingface_hub's download code,
        # 0.2 CPU-s here). CPU time, not wall time: other tenants of a shared CI machine do not inflate it
        assert got["cpu_seconds"] < (5 if "hub-id" in name else 1), got["cpu_seconds"]
    else:
        assert message in got["out"], got["out"]


def test_check_names_agree_with_the_checks():
    from verify.checks import ALL_CHECKS
    from verify.preflight import CHECK_NAMES

    assert tuple(n for n, _ in ALL_CHECKS) == CHECK_NAMES
    assert CHECKS == ", ".join(CHECK_NAMES)


def test_output_hub_path_is_the_push_target():
    """The upstream script's --output_hub_path means the Hub repo to push to (verification-gated, like
    --push-to-hub); it no longer turns into a local folder named like a repo id."""
    from convert.cli import build_parser

    args = build_parser().parse_args(["--original", "o", "--output", "local", "--output_hub_path", "me/repo"])
    assert args.push_to_hub == "me/repo" and args.output == "local"


# --- the library API checks its arguments before any work ------------------------------------------------------
@pytest.mark.parametrize(
    "only, words",
    [
        (["logit"], f"--only logit: no such check; the checks are {CHECKS}"),
        ([], "no check named; a report with zero checks proves nothing"),
        ("logits", "expected a list of check names"),
    ],
)
def test_verify_repo_refuses_bad_check_names(converted, only, words):
    from verify.api import verify_repo
    from verify.context import VerifyUsageError

    with pytest.raises(VerifyUsageError, match=re.escape(words)):
        verify_repo(converted, only=only, progress=False)


@pytest.mark.parametrize("n", [-1, 0, 2.5, True])
def test_verify_repo_refuses_bad_token_counts(converted, n):
    from verify.api import verify_repo
    from verify.context import VerifyUsageError

    with pytest.raises(VerifyUsageError, match="--max-new-tokens"):
        verify_repo(converted, max_new_tokens=n, progress=False)


def test_a_report_without_applicable_checks_never_passes():
    from verify.report import FAIL, NA, PASS, Check, Report

    assert not Report(repo="r").passed
    assert "NOT PASSED" in Report(repo="r").table()
    na_only = Report(
        repo="r", checks=[Check("files", NA, "not applicable: no conversion.json")], audit="no conversion.json"
    )
    assert not na_only.passed and "NOT PASSED: no applicable check ran" in na_only.table()
    mixed = Report(
        repo="r", checks=[Check("files", NA, "n/a"), Check("mapping", PASS, "ok")], audit="no conversion.json"
    )
    assert mixed.passed and "ALL APPLICABLE CHECKS PASSED (audit; not applicable: files)" in mixed.table()
    # a repo this tool wrote whose N/A check is backbone-specific (tokenizer_era on Llama-3 / Phi-3) is no audit
    own = Report(repo="r", checks=[Check("tokenizer_era", NA, "n/a"), Check("mapping", PASS, "ok")])
    assert own.passed and own.table().splitlines()[-1] == "ALL APPLICABLE CHECKS PASSED (not applicable: tokenizer_era)"
    assert not Report(repo="r", checks=[Check("files", NA, "n/a"), Check("mapping", FAIL, "bad")]).passed


def test_convert_api_checks_numbers_before_reading(tiny, tmp_path):
    from convert.errors import ConversionError
    from convert.pipeline import Options, convert

    for kw, words in (
        ({"seed": -1}, "--seed"),
        ({"max_shard_size": "0"}, "--max-shard-size"),
        ({"dtype": "fp8"}, "--dtype"),
    ):
        with pytest.raises(ConversionError, match=re.escape(words)):
            convert(Options(original=str(tmp_path / "not-read"), output=tmp_path / "out", progress=False, **kw))
    assert not (tmp_path / "out").exists()


# --- real runs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_follows_the_umask_and_says_when_it_builds_the_fixture(
    tmp_path, monkeypatch, capsys, umask, dir_mode, file_mode
):
    from convert.cli import main

    monkeypatch.setenv("VIPLLAVA_HARNESS_CACHE", str(tmp_path / "cache"))  # a cold cache: the fixture is built
    old = os.umask(umask)
    try:
        assert main(["--demo", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert f"building the tiny vicuna fixture once (a few seconds; cached in {tmp_path / 'cache'}" in err
    assert (tmp_path / "out").stat().st_mode & 0o777 == dir_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {file_mode}, modes


def test_verify_progress_names_the_check_and_shows_no_foreign_bar_nor_estimate(converted, capsys):
    from verify.api import verify_repo

    report = verify_repo(converted, only=["files", "mapping", "strict_load"], progress=True)
    err = capsys.readouterr().err
    assert report.passed and [c.name for c in report.checks] == ["files", "mapping", "strict_load"]
    for name in ("files", "mapping", "strict_load"):
        assert f"verify: {name} (" in err, err
    assert "Loading weights" not in err  # transformers' own bar stays off while verifying
    assert not re.search(r"\d\d:\d\d<", err) and "?it/s" not in err and "it/s]" not in err  # no remaining-time estimate


# Ctrl-C at known moments of the work: VIPLLAVA_FAULT="<point>:sigint" makes the process send itself a SIGINT
# there (convert/faults.py), the same signal and handler a terminal's Ctrl-C reaches, so every moment is hit on
# every machine, however fast.
def _interrupted(argv: list[str], point: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = _env(VIPLLAVA_HARNESS_CACHE=str(cache), VIPLLAVA_FAULT=f"{point}:sigint" if point else "")
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    """One fixture cache for the interrupted demos (the first run builds the tiny fixture into it)."""
    return tmp_path_factory.mktemp("demo-cache")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".vipllava-tmp-", ".vipllava-report-")))


@pytest.mark.parametrize("point", ["tensor_write", "before_fsync", "before_rename", "converted"])
def test_ctrl_c_during_convert_is_one_line_and_130(tmp_path, demo_cache, point):
    """Before the rename nothing of the run is left and the line says so; once the output is in place the line
    says the repo is complete, and it is."""
    out = tmp_path / "out"
    done = _interrupted(["convert", "--demo", str(out), "--quiet"], point, tmp_path, demo_cache)
    assert done.returncode == 130, done.stderr
    assert not _temporaries(tmp_path)
    if point == "converted":
        assert done.stderr == f"error: interrupted; the converted repo is complete at {out}\n"
        assert json.loads((out / "conversion.json").read_text())
    else:
        assert done.stderr == "error: interrupted; no output was written\n"
        assert not out.exists()


def test_ctrl_c_while_replacing_keeps_the_previous_output_or_says_the_new_one_is_whole(tmp_path, demo_cache):
    """--force over a previous conversion: a Ctrl-C before the swap leaves the previous folder as it was; one right
    after the swap leaves the new one, says so, and removes the previous one (now at the temporary name)."""
    out = tmp_path / "out"
    assert _interrupted(["convert", "--demo", str(out), "--quiet"], "", tmp_path, demo_cache).returncode == 0
    previous = out.stat().st_ino
    argv = ["convert", "--demo", str(out), "--quiet", "--force"]
    done = _interrupted(argv, "before_rename", tmp_path, demo_cache)
    assert (done.returncode, done.stderr) == (130, "error: interrupted; no output was written\n")
    assert out.stat().st_ino == previous and (out / "conversion.json").is_file() and not _temporaries(tmp_path)
    done = _interrupted(argv, "after_exchange", tmp_path, demo_cache)
    assert (done.returncode, done.stderr) == (130, f"error: interrupted; the converted repo is complete at {out}\n")
    assert out.stat().st_ino != previous and (out / "conversion.json").is_file() and not _temporaries(tmp_path)


@pytest.mark.parametrize(
    "point, only",
    [("check:files", ["files"]), ("check:generation", ["logits", "generation"]), ("report_json", ["files"])],
    ids=["first-check", "after-the-models-ran", "json-written-not-renamed"],
)
def test_ctrl_c_during_verify_is_one_line_and_130(converted, tmp_path, demo_cache, point, only):
    """At the first check, after the models have run, and with the JSON report written but not yet in place: one
    line, exit 130, and no report nor temporary file behind."""
    argv = ["verify", str(converted), "--quiet", "--json", str(tmp_path / "r.json")]
    done = _interrupted([*argv, *(a for c in only for a in ("--only", c))], point, tmp_path, demo_cache)
    assert (done.returncode, done.stderr) == (130, "error: interrupted; nothing was written\n")
    assert not (tmp_path / "r.json").exists() and not _temporaries(tmp_path)
    done = _interrupted([*argv, "--only", "files"], "", tmp_path, demo_cache)  # the same run, not interrupted
    assert done.returncode == 0 and json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert not _temporaries(tmp_path)


def test_ctrl_c_removes_the_temporary_folder_of_a_long_output_name(tmp_path, demo_cache):
    """A name too long to carry in the temporary folder's name is replaced there by a digest: the interrupt's
    cleanup finds that folder too, and nothing is left for the next run to sweep."""
    out = tmp_path / ("o" * 200)
    done = _interrupted(["convert", "--demo", str(out), "--quiet"], "tensor_write", tmp_path, demo_cache)
    assert (done.returncode, done.stderr) == (130, "error: interrupted; no output was written\n")
    assert not out.exists() and not _temporaries(tmp_path)


def test_verify_json_writes_through_a_symlink_and_to_stdout(converted, tmp_path, demo_cache):
    """--json is renamed into place only over a regular file: a symlink stays a link (its target gets the report),
    and /dev/stdout is written to, not replaced."""
    target = tmp_path / "target.json"
    target.write_text("{}")
    (tmp_path / "link.json").symlink_to(target)
    argv = ["verify", str(converted), "--quiet", "--only", "files"]
    done = _interrupted([*argv, "--json", str(tmp_path / "link.json")], "", tmp_path, demo_cache)
    assert done.returncode == 0 and (tmp_path / "link.json").is_symlink(), done.stderr
    assert json.loads(target.read_text())["passed"] is True and not _temporaries(tmp_path)
    was_link = os.path.islink("/dev/stdout")
    done = _interrupted([*argv, "--json", "/dev/stdout"], "", tmp_path, demo_cache)
    assert done.returncode == 0 and os.path.islink("/dev/stdout") == was_link, done.stderr
    assert '"passed": true' in done.stdout
