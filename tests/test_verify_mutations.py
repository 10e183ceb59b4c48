"""Every verify check, seen failing: each test plants one defect in a copy of the converted tiny repo and expects
verify to fail (exit 1) naming the check that looks for it. Defects a buggy converter would write come with a
consistent manifest (re-hashed), so the targeted check, not the file hashes, has to catch them; corruption after
the fact (flipped byte, lost shard) keeps the manifest as written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.build import sample_images, sample_prompts
from verify.api import verify_repo

PROMPTS = [p for p in sample_prompts() if p["name"] in ("wide_colour", "text_only", "two_turn", "image_then_space")]
V = 997


def _rehash(repo: Path) -> None:
    m = json.loads((repo / "conversion.json").read_text())
    m["outputs"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.iterdir())
        if p.name != "conversion.json"
    }
    (repo / "conversion.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def _edit_tensors(repo: Path, fn) -> None:
    for f in repo.glob("*.safetensors"):
        sd = load_file(str(f))
        fn(sd)
        save_file(sd, str(f), metadata={"format": "pt"})
    _rehash(repo)


def _edit_json(repo: Path, name: str, fn) -> None:
    p = repo / name
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj, indent=2))
    _rehash(repo)


def _verify(repo: Path, **kw):
    return verify_repo(repo, prompts=PROMPTS, images=sample_images(), max_new_tokens=4, progress=False, **kw)


@pytest.fixture()
def repo(converted, tmp_path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(converted, dst)
    return dst


# --- the planted defects ---------------------------------------------------------------------------------------
def swap_decoder_layers(repo):
    def fn(sd):
        for k in [k for k in sd if k.startswith("language_model.model.layers.0.")]:
            j = k.replace("layers.0.", "layers.1.")
            sd[k], sd[j] = sd[j], sd[k]

    _edit_tensors(repo, fn)


def zero_projector_ln_bias(repo):
    _edit_tensors(repo, lambda sd: sd["multi_modal_projector.projector_layernorm.bias"].zero_())


def reorder_feature_layers(repo):
    _edit_json(repo, "config.json", lambda c: c.__setitem__("vision_feature_layers", [-5, -2, -8, -11, 6]))


def no_pad_to_square(repo):
    _edit_json(repo, "preprocessor_config.json", lambda c: c.__setitem__("do_pad", False))


def image_id_differs(repo):
    """The tokenizer puts <image> at 998 and <pad> at 997; the config still says image_token_index 997."""

    def tok(t):
        for a in t["added_tokens"]:
            if a["content"] in ("<image>", "<pad>"):
                a["id"] = 998 if a["content"] == "<image>" else 997
        t["added_tokens"].sort(key=lambda a: a["id"])

    _edit_json(repo, "tokenizer.json", tok)

    def cfg(c):
        d = c["added_tokens_decoder"]
        d["997"], d["998"] = d["998"], d["997"]

    _edit_json(repo, "tokenizer_config.json", cfg)


def inflate_new_rows(repo):
    """New rows drawn with 100x the covariance: 10x the distance from mu."""

    def fn(sd):
        E = sd["language_model.model.embed_tokens.weight"]
        mu = E[:V].float().mean(0)
        E[V:] = (mu + 10 * (E[V:].float() - mu)).to(E.dtype)

    _edit_tensors(repo, fn)


def flip_a_byte(repo):
    f = repo / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def lose_a_shard(repo):
    (repo / "model.safetensors").unlink()


def metaspace_first_tokenizer(repo):
    """The measured trap: a fast tokenizer that prepends the dummy prefix only to the first segment."""

    def fn(t):
        t["normalizer"] = None
        t["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}

    _edit_json(repo, "tokenizer.json", fn)


def pad_ids_disagree(repo):
    _edit_json(repo, "generation_config.json", lambda g: g.__setitem__("pad_token_id", 0))


def drop_a_tensor(repo):
    _edit_tensors(repo, lambda sd: sd.pop("vision_tower.vision_model.post_layernorm.bias"))


MUTATIONS = [
    # (defect, checks that must FAIL, first diverging module named by the logits check or None)
    (swap_decoder_layers, {"mapping", "logits", "generation"}, "decoder.layer.0"),
    (zero_projector_ln_bias, {"mapping", "logits"}, "projector"),
    (reorder_feature_layers, {"logits"}, "projector"),
    (no_pad_to_square, {"processor"}, None),
    (image_id_differs, {"strict_load"}, None),
    (inflate_new_rows, {"resize"}, None),
    (flip_a_byte, {"files"}, None),
    (lose_a_shard, {"files"}, None),
    (metaspace_first_tokenizer, {"processor"}, None),
    (pad_ids_disagree, {"strict_load"}, None),
    (drop_a_tensor, {"mapping", "strict_load"}, None),
]


@pytest.mark.parametrize("defect,must_fail,divergence", MUTATIONS, ids=[m[0].__name__ for m in MUTATIONS])
def test_planted_defect_fails_the_right_check(repo, defect, must_fail, divergence):
    defect(repo)
    report = _verify(repo)
    failed = set(report.failed_checks)
    assert not report.passed
    assert must_fail <= failed, report.table()
    if divergence:
        first = report.get("logits").details[0]
        assert first.startswith(f"first divergence: {divergence} "), report.table()


MODEL_PATH_MUTATIONS = [m for m in MUTATIONS if m[2]]


@pytest.mark.parametrize(
    "defect,must_fail,divergence", MODEL_PATH_MUTATIONS, ids=[m[0].__name__ for m in MODEL_PATH_MUTATIONS]
)
def test_planted_model_defect_fails_at_the_bfloat16_tolerance(repo, defect, must_fail, divergence):
    """The short form (--dtype bfloat16, issue 14) compares logits at 0.05, not 1e-4: a defect in the model's path
    still fails logits there, and the first diverging module is still named."""
    defect(repo)
    report = _verify(repo, dtype="bfloat16", only=["logits", "generation"])
    assert not report.passed and "logits" in report.failed_checks, report.table()
    assert report.get("logits").numbers["tolerance"] == 5e-2, report.table()
    assert report.get("logits").details[0].startswith(f"first divergence: {divergence} "), report.table()


def test_clean_repo_passes_in_bfloat16(converted):
    report = _verify(converted, dtype="bfloat16", only=["logits", "generation"])
    assert report.passed, report.table()


def test_clean_repo_passes_with_measured_numbers(converted):
    report = _verify(converted, dtype="float32")  # the default (the checkpoint's bf16): tests/test_verify_generation.py
    assert report.passed, report.table()
    logits = report.get("logits").numbers
    assert logits["max_abs_diff"] <= logits["tolerance"] == 1e-4
    assert logits["top1_decided"] > 0 and logits["top1_agree"] == logits["top1_decided"]
    assert report.get("mapping").numbers["bit_identical"] == 226


def test_tensor_left_out_of_the_index(tiny, tmp_path):
    from tests.conftest import run_convert

    repo = tmp_path / "sharded"
    assert run_convert(tiny, repo, "--max-shard-size", "200KB") == 0
    _edit_json(repo, "model.safetensors.index.json", lambda i: i["weight_map"].pop("language_model.model.norm.weight"))
    report = verify_repo(
        repo, prompts=PROMPTS[:1], images=sample_images(), max_new_tokens=1, progress=False, only=["files"]
    )
    check = report.get("files")
    assert check.failed and any(
        "language_model.model.norm.weight: in " in d and "not in the index" in d for d in check.details
    )


def test_added_token_mass_warns_when_above_an_original_token(converted, monkeypatch):
    """The WARN path of the resize check: logits that put most mass on the added rows."""
    from verify import checks
    from verify.context import Context

    ctx = Context(converted, prompts=PROMPTS[:1], images=sample_images())
    fake = torch.zeros(5, 1024)
    fake[:, V:] = 10.0
    monkeypatch.setattr(Context, "converted_logits", [fake], raising=False)
    result = checks.check_resize(ctx)
    assert result.status == "WARN" and any("added tokens get" in d for d in result.details)


def test_cli_exit_codes_and_json(repo, tmp_path, capsys):
    from verify.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS[:2]))
    images = tmp_path / "images"
    images.mkdir()
    for name, im in sample_images().items():
        im.save(images / f"{name}.png")
    args = [str(repo), "--prompts", str(prompts), "--images", str(images), "--max-new-tokens", "2", "--quiet"]
    assert main(args + ["--json", str(tmp_path / "ok.json")]) == 0
    assert json.loads((tmp_path / "ok.json").read_text())["passed"] is True
    zero_projector_ln_bias(repo)
    assert main(args + ["--json", str(tmp_path / "bad.json")]) == 1
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert "mapping" in bad["failed_checks"] and "logits" in bad["failed_checks"]
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_publication_files_are_allowed_but_other_unlisted_files_fail(repo):
    (repo / "README.md").write_text("# model card\n")
    (repo / "verification.json").write_text("{}\n")
    report = verify_repo(repo, prompts=PROMPTS[:1], images=sample_images(), progress=False, only=["files"])
    assert report.passed and report.get("files").numbers["publication_files"] == ["README.md", "verification.json"]
    (repo / "stale-shard.safetensors.bak").write_bytes(b"x")
    report = verify_repo(repo, prompts=PROMPTS[:1], images=sample_images(), progress=False, only=["files"])
    assert report.failed_checks == ["files"]
    assert any(
        "stale-shard.safetensors.bak: in the repo but not in conversion.json" in d for d in report.get("files").details
    )


# --- the Llama-3 and Phi-3 backbones ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone_repos(backbone_pair) -> dict:
    """The session's converted tiny Llama-3 and Phi-3 repos (read only: a test that edits one copies it first)."""
    return {name: backbone_pair(name)[1] for name in ("llama3", "phi3")}


def _verify_backbone(repo: Path, **kw):
    return verify_repo(repo, images=sample_images(), max_new_tokens=4, progress=False, **kw)


@pytest.fixture()
def llama3_repo(backbone_repos, tmp_path) -> Path:
    dst = tmp_path / "llama3"
    shutil.copytree(backbone_repos["llama3"], dst)
    return dst


@pytest.mark.parametrize("backbone", ["llama3", "phi3"])
def test_clean_backbone_repo_passes(backbone_repos, backbone):
    report = _verify_backbone(backbone_repos[backbone])
    assert report.passed, report.table()
    assert report.settings["backbone"] == backbone
    assert report.get("chat_template").numbers["identical"] == report.get("chat_template").numbers["compared"] > 0
    assert report.get("logits").numbers["max_abs_diff"] <= 1e-4
    lay = report.get("strict_load").numbers["expected"]
    assert (lay["image"], lay["pad"], lay["rows"]) == {"llama3": (1000, 1001, 1024), "phi3": (1008, 1009, 1024)}[
        backbone
    ]
    if backbone == "phi3":
        assert report.get("resize").summary.startswith("rows 1024 = V: no new rows")


def _edit_chat_template(repo: Path, fn) -> None:
    """Apply ``fn`` to the chat template wherever the repo stores it."""
    changed = 0
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        p = repo / name
        if not p.is_file():
            continue
        obj = json.loads(p.read_text())
        if isinstance(obj.get("chat_template"), str):
            new = fn(obj["chat_template"])
            changed += new != obj["chat_template"]
            obj["chat_template"] = new
            p.write_text(json.dumps(obj, indent=2))
    jinja = repo / "chat_template.jinja"
    if jinja.is_file():
        new = fn(jinja.read_text())
        changed += new != jinja.read_text()
        jinja.write_text(new)
    assert changed, "no chat template found to edit"
    _rehash(repo)


def llama3_header_without_blank_line(repo):
    """The template drops the "\\n\\n" after <|end_header_id|> (a plausible slip: Llama-3's own template has it)."""
    _edit_chat_template(
        repo,
        lambda t: t.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>").replace(
            "<|end_header_id|>\n\n", "<|end_header_id|>"
        ),
    )


def llama3_generation_config_without_eot(repo):
    _edit_json(repo, "generation_config.json", lambda g: g.__setitem__("eos_token_id", [901]))


def llama3_image_id_is_t_minus_1(repo):
    """An off-by-one converter: <image> at T-1 = 999 (swapped with <|reserved_special_token_94|>), config to match."""

    def tok(t):
        for a in t["added_tokens"]:
            if a["content"] == "<image>":
                a["id"] = 999
            elif a["id"] == 999:
                a["id"] = 1000
        t["added_tokens"].sort(key=lambda a: a["id"])

    _edit_json(repo, "tokenizer.json", tok)

    def cfg(c):
        d = c.get("added_tokens_decoder", {})
        if "999" in d and "1000" in d:
            d["999"], d["1000"] = d["1000"], d["999"]

    _edit_json(repo, "tokenizer_config.json", cfg)
    _edit_json(repo, "config.json", lambda c: c.__setitem__("image_token_index", 999))


def llama3_recorded_as_vicuna(repo):
    _edit_json(repo, "conversion.json", lambda m: m.setdefault("settings", {}).__setitem__("backbone", "vicuna"))


BACKBONE_MUTATIONS = [
    (llama3_header_without_blank_line, {"chat_template"}, "first difference at char"),
    (llama3_generation_config_without_eot, {"generation"}, "lacks the original terminator <|eot_id|> (909)"),
    (llama3_image_id_is_t_minus_1, {"strict_load"}, "expected T = 1000"),
    (llama3_recorded_as_vicuna, {"strict_load"}, "records 'vicuna', the original is 'llama3'"),
]


@pytest.mark.parametrize("defect,must_fail,says", BACKBONE_MUTATIONS, ids=[m[0].__name__ for m in BACKBONE_MUTATIONS])
def test_planted_backbone_defect_fails_the_right_check(llama3_repo, defect, must_fail, says):
    defect(llama3_repo)
    checks = sorted(must_fail | {"files"})
    report = _verify_backbone(llama3_repo, only=checks)
    assert must_fail <= set(report.failed_checks), report.table()
    assert "files" not in report.failed_checks, (
        report.table()
    )  # the manifest was re-hashed: the targeted check caught it
    details = [d for name in must_fail for d in report.get(name).details]
    assert any(says in d for d in details), report.table()


def test_prompts_file_takes_conversations(llama3_repo, tmp_path):
    from verify.cli import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            [
                {
                    "name": "conv",
                    "image": "box",
                    "turns": [
                        {"role": "user", "text": "<image>\nWhat is inside the red box?"},
                        {"role": "assistant", "text": None},
                    ],
                },
                {
                    "name": "raw",
                    "image": None,
                    "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                },
            ]
        )
    )
    out = tmp_path / "r.json"
    args = [
        str(llama3_repo),
        "--prompts",
        str(prompts),
        "--only",
        "chat_template",
        "--only",
        "processor",
        "--quiet",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    chat = next(c for c in rep["checks"] if c["name"] == "chat_template")
    assert chat["numbers"]["source"] == "prompts" and chat["numbers"]["conversations"] == 1
    assert rep["settings"]["prompts"] == ["conv", "raw"] and rep["settings"]["backbone"] == "llama3"
    prompts.write_text(json.dumps([{"name": "bad", "turns": [{"role": "robot", "text": "x"}]}]))
    assert main(args) == 2
