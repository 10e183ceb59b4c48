"""Publishing (``python -m convert --push-to-hub``, the ``publish`` package): a repo that fails verification is
never sent; a verified one goes up complete, in one commit, with its model card and report; Hub errors are one line.

The ONLY thing replaced is the object that talks to the Hub: :class:`tests.recording_hub.RecordingHubApi`, passed
as ``api=`` to the library or as ``hub_api=`` to the command line (``convert.cli.main``). Conversions,
verification, the commit's operations and the card are real.
The CLI tests run the full default verification (as ``--push-to-hub`` does); the library tests pass the real
``verify_repo`` with four of the sample prompts and 4 greedy tokens, to stay fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import convert
import publish as publish_mod
from convert.model_card import model_card
from publish import PublishError, publish
from tests.conftest import run_convert
from tests.recording_hub import RecordingHubApi
from verify.api import verify_repo
from verify.samples import sample_images, sample_prompts

REPO_ID = "someone/vip-llava-tiny-hf"
PROMPTS = [p for p in sample_prompts() if p["name"] in ("wide_colour", "text_only", "two_turn", "image_then_space")]
fast_verify = functools.partial(verify_repo, prompts=PROMPTS, images=sample_images(), max_new_tokens=4, progress=False)
# the original llava_v1 format, spelled out here independently of convert.model_card
LLAVA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions. USER: <image>\n{question} ASSISTANT:"
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def repo(converted, tmp_path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(converted, dst)
    return dst


@pytest.fixture()
def hub() -> RecordingHubApi:
    """The recording API; each test passes it on (``api=`` or ``hub_api=``)."""
    return RecordingHubApi()


def _local_state(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir())}


def _zero_projector_ln_bias(folder: Path) -> None:
    """A defect a buggy converter could write, with a consistent (re-hashed) manifest, as in test_verify_mutations."""
    for f in folder.glob("*.safetensors"):
        sd = load_file(str(f))
        sd["multi_modal_projector.projector_layernorm.bias"].zero_()
        save_file(sd, str(f), metadata={"format": "pt"})
    m = json.loads((folder / "conversion.json").read_text())
    m["outputs"] = {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.name != "conversion.json"}
    (folder / "conversion.json").write_text(json.dumps(m, indent=2, sort_keys=True))


# --- the library ------------------------------------------------------------------------------------------------
def test_failing_verification_is_never_pushed(repo):
    _zero_projector_ln_bias(repo)
    before = _local_state(repo)
    api = RecordingHubApi()
    result = publish(repo, REPO_ID, api=api, verify=fast_verify)
    assert result.refused and not result.pushed and "logits" in result.report.failed_checks
    assert api.calls == [] and api.commits == []
    assert _local_state(repo) == before


def test_passing_conversion_is_pushed_in_one_complete_commit_with_card_and_report(repo):
    before = _local_state(repo)
    stale = ["model-00001-of-00002.safetensors", "old/notes.txt"]
    api = RecordingHubApi(remote_files=[".gitattributes", "model.safetensors", *stale])
    result = publish(repo, REPO_ID, api=api, verify=fast_verify)
    assert result.pushed and [name for name, _ in api.calls] == ["create_repo", "list_repo_files", "create_commit"]
    assert api.calls[0][1]["exist_ok"] is True and api.calls[0][1]["private"] is None
    assert len(api.commits) == 1
    commit, kw = api.commits[0], api.calls[2][1]
    # every converted file, byte for byte, plus the card and the report; nothing else
    assert set(commit["files"]) == set(before) | {"README.md", "verification.json"}
    assert {n: d for n, d in commit["files"].items() if n in before} == before
    # the branch ends up holding exactly the verified folder: leftovers deleted in the same commit, .gitattributes kept
    assert commit["deleted"] == stale and result.deleted == stale
    report_json = json.loads(commit["texts"]["verification.json"])
    assert report_json["passed"] and [c["status"] for c in report_json["checks"]] == ["PASS"] * 9
    assert (
        report_json["environment"]["transformers"]
        and report_json["environment"]["tool"] == f"vipllava-harness {convert.__version__}"
    )
    manifest = json.loads((repo / "conversion.json").read_text())
    assert commit["texts"]["README.md"] == model_card(manifest, report_json, None, repo_id=REPO_ID)
    assert (
        kw["commit_message"]
        == f"Convert ViP-LLaVA with vipllava-harness {convert.__version__}: verify 9/9 checks passed"
    )
    assert kw["revision"] is None and kw["repo_id"] == REPO_ID and "logits: PASS" in kw["commit_description"]
    # the local output is untouched and still verifies (verify's files check rejects unlisted files)
    assert _local_state(repo) == before
    assert verify_repo(repo, only=["files"], progress=False).passed


def test_private_on_an_existing_public_repo_is_refused_before_uploading(repo):
    api = RecordingHubApi(existing_public=True)
    with pytest.raises(PublishError, match="exists and is public") as e:
        publish(repo, REPO_ID, private=True, api=api, verify=fast_verify)
    assert (
        "\n" not in str(e.value) and [name for name, _ in api.calls] == ["create_repo", "repo_info"] and not api.commits
    )


def test_http_error_exits_2_with_one_line(repo, hub, capsys):
    hub.fail_at = "create_commit"
    code = publish_mod.run(repo, REPO_ID, private=False, revision=None, progress=False, verify=fast_verify, api=hub)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert (
        err.startswith(f"error: pushing to {REPO_ID} failed at create_commit: 401 Client Error") and "HF_TOKEN" in err
    ), err
    assert err.endswith("no commit was made"), err
    hub.calls.clear()
    hub.fail_at = "create_repo"
    with pytest.raises(PublishError, match="failed at create_repo: 401.*nothing was uploaded"):
        publish(repo, REPO_ID, verify=fast_verify, api=hub)
    assert [name for name, _ in hub.calls] == ["create_repo"]


# --- the command line (full default verification, as --push-to-hub runs it) ------------------------------------------
def test_cli_refuses_to_push_a_conversion_that_fails_verification(tiny, hub, tmp_path, capsys, monkeypatch):
    """A conversion that verification rejects is never pushed: a planted converter bug (the new embedding rows
    drawn with 1e4 times the intended covariance) makes the resize check fail, and nothing reaches the Hub."""
    import convert.resize as resize_module

    real = resize_module.sample_new_rows
    monkeypatch.setattr(
        resize_module,
        "sample_new_rows",
        lambda embed, count, generator, scale=resize_module.SCALE: real(embed, count, generator, scale * 1e4),
    )
    out = tmp_path / "out"
    code = run_convert(tiny, out, "--push-to-hub", REPO_ID, hub_api=hub)
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert hub.calls == [] and hub.commits == []
    assert "not pushed to" in captured.err and "resize" in captured.err, captured.err
    assert "FAILED: resize" in captured.out, captured.out
    assert (out / "conversion.json").is_file() and not (out / "README.md").exists()


def test_cli_pushes_a_verified_conversion_to_a_new_private_branch(tiny, hub, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_convert(tiny, out, "--push-to-hub", REPO_ID, "--private", "--push-branch", "conversion-v1", hub_api=hub)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [name for name, _ in hub.calls] == [
        "create_repo",
        "repo_info",
        "create_branch",
        "list_repo_files",
        "create_commit",
    ]
    assert hub.calls[0][1]["private"] is True and hub.calls[2][1] == {
        "repo_id": REPO_ID,
        "branch": "conversion-v1",
        "exist_ok": True,
    }
    assert hub.calls[3][1]["revision"] == "conversion-v1"
    kw = hub.calls[4][1]
    assert kw["revision"] == "conversion-v1" and kw["commit_message"].endswith(
        f"{convert.__version__}: verify 9/9 checks passed"
    )
    local = _local_state(out)
    assert set(hub.commits[0]["files"]) == set(local) | {"README.md", "verification.json"}
    assert all(hub.commits[0]["files"][n] == d for n, d in local.items())
    report_json = json.loads(hub.commits[0]["texts"]["verification.json"])
    assert len(report_json["settings"]["prompts"]) == len(sample_prompts())  # the full default verification ran
    assert f"pushed to {REPO_ID}@conversion-v1: Convert ViP-LLaVA with vipllava-harness" in captured.out
    assert "Loading weights" not in captured.err  # --quiet holds for transformers' bars too


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--push-to-hub", "not a repo id"], "not a valid repo id"),
        (["--private"], "only apply with --push-to-hub"),
        (["--push-branch", "v1"], "only apply with --push-to-hub"),
        (["--revision", "v1"], "--push-branch BRANCH"),
    ],
)
def test_cli_push_usage_errors_stop_before_converting(tiny, hub, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run_convert(tiny, out, *extra, hub_api=hub) == 2
    assert message in capsys.readouterr().err and not out.exists() and hub.calls == []


def test_cli_push_while_offline_stops_before_converting(tiny, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as c

    def unreachable(*args, **kwargs):
        raise AssertionError("the real HfApi was reached")

    monkeypatch.setattr(huggingface_hub, "HfApi", unreachable)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert run_convert(tiny, out, "--push-to-hub", REPO_ID) == 2  # no hub_api: the real HfApi would be used
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not out.exists()
    # the check is about the real client only: an injected one is used offline as it is
    assert publish_mod.preflight(REPO_ID) is not None and publish_mod.preflight(REPO_ID, api=RecordingHubApi()) is None


# --- the model card -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def card_inputs(converted) -> tuple[dict, dict]:
    """The converted fixture's manifest, as if its inputs had come from the Hub, and a real verification report."""
    manifest = json.loads((converted / "conversion.json").read_text())
    for key, repo_id, commit in (
        ("original", "mucai/vip-llava-7b", "a" * 40),
        ("text_model", "lmsys/vicuna-7b-v1.5", "b" * 40),
        ("vision_model", "openai/clip-vit-large-patch14-336", "c" * 40),
    ):
        manifest["inputs"][key].update(repo_id=repo_id, revision=commit, source=repo_id)
    return manifest, json.loads(fast_verify(converted).to_json())


def _front_matter(card: str) -> tuple[dict, str]:
    m = re.fullmatch(r"---\n(.*?)\n---\n(.*)", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def test_model_card_front_matter_and_sections(card_inputs):
    manifest, report_json = card_inputs
    card = model_card(manifest, report_json, None, repo_id=REPO_ID)
    meta, body = _front_matter(card)
    assert meta == {
        "license": "llama2",
        "base_model": ["mucai/vip-llava-7b"],
        "pipeline_tag": "image-text-to-text",
        "library_name": "transformers",
        "tags": ["vipllava", "vip-llava"],
    }
    headings = re.findall(r"^## (.+)$", body, re.M)
    assert headings == ["Inputs", "Conversion", "Verification", "Proven transformers versions", "Usage", "License"]
    assert body.count("```python") == 2 and body.count("```") == 4  # usage, and the recipe for transformers < 4.49


def test_model_card_states_inputs_settings_and_measured_verification(card_inputs):
    manifest, report_json = card_inputs
    card = model_card(manifest, report_json, None)
    for key, rec in manifest["inputs"].items():
        assert f"`{rec['repo_id']}` at commit `{rec['revision']}`" in card, key
        for name, digest in rec["files"].items():
            assert f"| `{name}` | `{digest}` |" in card, (key, name)
    for name, digest in manifest["outputs"].items():
        assert f"| `{name}` | `{digest}` |" in card, name
    s, env = manifest["settings"], manifest["environment"]
    assert f"| seed (new embedding rows) | {s['seed']} |" in card and f"written `{s['output_dtype']}`" in card
    assert f"| max shard size | {s['max_shard_size']} bytes" in card
    assert f"vipllava-harness {convert.__version__}" in card
    assert f"| transformers | {env['transformers']} |" in card and f"| torch | {env['torch']} |" in card
    rows = {m.group(1): m for m in re.finditer(r"^\| (\w+) \| (PASS|WARN|FAIL) \| `(.*)` \| .* \|$", card, re.M)}
    assert list(rows) == [c["name"] for c in report_json["checks"]]
    for c in report_json["checks"]:
        assert rows[c["name"]].group(2) == c["status"] and rows[c["name"]].group(3) == c["summary"].replace("|", "\\|")
    logits = next(c for c in report_json["checks"] if c["name"] == "logits")["numbers"]
    resize = next(c for c in report_json["checks"] if c["name"] == "resize")["numbers"]
    assert f"max \\|diff\\| {logits['max_abs_diff']:.3g} <= {logits['tolerance']:g}" in rows["logits"].group(3)
    assert f"d_max {resize['embed_tokens']['d_max']:.3g}/" in rows["resize"].group(3)
    # which version verified it, or the proven versions when given
    assert f"Verified with transformers {report_json['environment']['transformers']}" in card
    bare = {k: v for k, v in report_json.items() if k != "environment"}
    assert f"Converted with transformers {env['transformers']}" in model_card(manifest, bare, None)
    with_env = {**report_json, "environment": {"transformers": "9.9.9", "torch": "8.8.8"}}
    assert "Verified with transformers 9.9.9 (torch 8.8.8)" in model_card(manifest, with_env, None)
    assert "transformers 4.51.3, 4.57.6, 5.24.0" in model_card(manifest, report_json, ["4.51.3", "4.57.6", "5.24.0"])


def test_model_card_prompt_format_license_and_local_inputs(card_inputs, converted):
    manifest, report_json = card_inputs
    card = model_card(manifest, report_json, None)
    assert json.dumps(LLAVA_V1) in card  # byte for byte, as the Python string literal in the snippet
    # the same format verify used for its sample prompts
    box = next(p for p in sample_prompts() if p["name"] == "box_inside")
    assert box["prompt"] == LLAVA_V1.format(question="What is inside the red box?")
    assert "processor.apply_chat_template(conversation, add_generation_prompt=True)" in card
    assert '[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]' in card
    assert "VipLlavaForConditionalGeneration.from_pretrained(" in card and "AutoProcessor.from_pretrained(" in card
    assert "Llama 2 Community License" in card and "https://ai.meta.com/llama/license/" in card
    assert (
        "https://huggingface.co/mucai/vip-llava-7b" in card and "https://github.com/WisconsinAIVision/ViP-LLaVA" in card
    )
    # local inputs: paths instead of revisions, no base_model, license assumed and said so
    local = json.loads((converted / "conversion.json").read_text())
    card = model_card(local, report_json, None)
    meta, _ = _front_matter(card)
    assert meta["license"] == "llama2" and "base_model" not in meta
    assert f"the local path `{local['inputs']['original']['path']}`, no Hub revision" in card and "is assumed" in card


def test_model_card_usage_snippet_runs_and_chat_template_matches(card_inputs, converted):
    """The snippet, as printed, on the converted fixture: the chat template gives the llava_v1 text, and it runs."""
    from transformers import AutoProcessor

    question = "What is inside the red box?"
    processor = AutoProcessor.from_pretrained(converted)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == LLAVA_V1.format(question=question)

    manifest, report_json = card_inputs
    card = model_card(manifest, report_json, None, repo_id=REPO_ID)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    image = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "box.png"
    code = (
        code.replace(json.dumps(REPO_ID), json.dumps(str(converted)))
        .replace('"image.png"', json.dumps(str(image)))
        .replace("max_new_tokens=200", "max_new_tokens=4")
    )
    scope: dict = {}
    exec(compile(code, "model-card-snippet", "exec"), scope)
    assert scope["prompt"] == LLAVA_V1.format(question=question)
    assert scope["output"].shape[1] == scope["inputs"]["input_ids"].shape[1] + 4


@pytest.mark.parametrize(
    "backbone, license_id, words",
    [
        (
            "llama3",
            "llama3",
            [
                "Meta Llama 3 Community License",
                "llava_llama_3",
                '"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n',
            ],
        ),
        (
            "phi3",
            "mit",
            ["MIT License (Phi-3)", "llava_phi_3", '<|user|>\\n<image>\\n{question}<|end|>\\n<|assistant|>\\n"'],
        ),
    ],
)
def test_model_card_of_other_backbones_names_their_format_and_license(card_inputs, backbone, license_id, words):
    """The card of a Llama-3 or Phi-3 conversion shows that backbone's original prompt (the Python literal of the
    chat template's rendering) and its base model's license, not Vicuna's."""
    manifest, report_json = card_inputs
    manifest = {**manifest, "settings": {**manifest["settings"], "backbone": backbone}}
    card = model_card(manifest, report_json, None)
    meta, body = _front_matter(card)
    assert meta["license"] == license_id
    assert all(w in body for w in words), [w for w in words if w not in body]
    assert "Llama 2" not in body and "USER:" not in body
