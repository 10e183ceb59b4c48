"""The converter on the tiny fixture: strict load, ids, processor, bit-identical tensors, determinism, options."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from tests.conftest import run_convert
from verify.checks import canonical  # an independent statement of the layout (prefix rules, not our table)


def _tensors(repo: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(repo.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k)
    return out


def _original(tiny) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(tiny.original.glob("*.bin")):
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


def _digests(repo: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repo.iterdir())}


def test_strict_load_rows_and_ids(converted):
    from transformers import AutoTokenizer, VipLlavaForConditionalGeneration

    model, info = VipLlavaForConditionalGeneration.from_pretrained(str(converted), output_loading_info=True)
    assert {k: len(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": 0,
        "unexpected_keys": 0,
        "mismatched_keys": 0,
    }
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows == model.config.text_config.vocab_size == model.lm_head.weight.shape[0] == 1024
    tok = AutoTokenizer.from_pretrained(str(converted))
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [997, 998]
    assert model.config.image_token_index == 997 and tok.pad_token_id == 998
    assert model.config.text_config.rms_norm_eps == 1e-5  # from the ORIGINAL config, not the base model's 1e-6
    assert model.config.image_seq_length == 9


def test_processor_expands_one_image_to_image_seq_length(converted):
    from transformers import AutoProcessor

    from fixtures.build import sample_images

    proc = AutoProcessor.from_pretrained(str(converted))
    img = sample_images()["wide"]
    out = proc(text="USER: <image>\nWhat is it? ASSISTANT:", images=img, return_tensors="pt")
    assert int((out["input_ids"] == 997).sum()) == 9
    assert tuple(out["pixel_values"].shape) == (1, 3, 42, 42)


def test_every_original_tensor_once_bit_identical(tiny, converted):
    orig, conv = _original(tiny), _tensors(converted)
    seen = set()
    for key, value in orig.items():
        name = canonical(key)
        if name is None:
            continue  # legacy buffer
        seen.add(name)
        got = conv[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            got = got[: value.shape[0]]
        assert got.dtype == value.dtype and torch.equal(got.view(torch.uint8), value.view(torch.uint8)), name
    assert seen == set(conv)


def test_same_seed_same_bytes_other_seed_only_new_rows(tiny, converted, tmp_path):
    again = tmp_path / "again"
    assert run_convert(tiny, again) == 0
    assert _digests(again) == _digests(converted)
    other = tmp_path / "seed1"
    assert run_convert(tiny, other, "--seed", "1") == 0
    a, b = _tensors(converted), _tensors(other)
    for k in a:
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(a[k][:997], b[k][:997]) and not torch.equal(a[k][997:], b[k][997:]), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_dtype_float32_casts_every_tensor(tiny, tmp_path):
    out = tmp_path / "f32"
    assert run_convert(tiny, out, "--dtype", "float32") == 0
    conv, orig = _tensors(out), _original(tiny)
    assert {t.dtype for t in conv.values()} == {torch.float32}
    assert torch.equal(conv["language_model.model.norm.weight"], orig["model.norm.weight"].float())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_small_shards_get_a_sorted_index_and_load(tiny, tmp_path):
    from transformers import VipLlavaForConditionalGeneration

    out = tmp_path / "sharded"
    assert run_convert(tiny, out, "--max-shard-size", "200KB") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    _, info = VipLlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_safetensors_single_file_input(tmp_path):
    from fixtures.build import build

    fx = build(tmp_path / "fx", shards=1, fmt="safetensors")  # its own: one safetensors shard
    assert (fx.original / "model.safetensors").is_file()
    out = tmp_path / "out"
    assert run_convert(fx, out) == 0
    assert json.loads((out / "conversion.json").read_text())["settings"]["format"] == "safetensors"


def test_seed_script_aliases_and_force(tiny, tmp_path):
    from convert.cli import main

    out = tmp_path / "aliased"
    argv = [
        "--old_state_dict_id",
        str(tiny.original),
        "--text_model_id",
        str(tiny.text_model),
        "--vision_model_id",
        str(tiny.vision_model),
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    before = _digests(out)
    assert main(argv + ["--force", "--seed", "3"]) == 0
    assert _digests(out) != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vipllava-")]


def test_manifest_records_inputs_and_outputs(converted, tiny):
    m = json.loads((converted / "conversion.json").read_text())
    assert m["settings"]["seed"] == 0 and m["settings"]["output_dtype"] == "bfloat16"
    assert set(m["mapping"]["dropped"].values()) == {"drop.rotary_inv_freq", "drop.clip_position_ids"}
    assert m["inputs"]["original"]["path"] == str(tiny.original)
    assert set(m["inputs"]["original"]["files"]) >= {"config.json", "pytorch_model.bin.index.json"}
    assert set(m["outputs"]) == {p.name for p in converted.iterdir()} - {"conversion.json"}
    for name, digest in m["outputs"].items():
        assert hashlib.sha256((converted / name).read_bytes()).hexdigest() == digest


def test_summary_reports_what_happened(tiny, tmp_path, capsys):
    assert run_convert(tiny, tmp_path / "o") == 0
    text = capsys.readouterr().out
    assert "tensors mapped              226" in text and "997 -> 1024 (+27)" in text


def test_non_legacy_base_tokenizer_is_reproduced_and_the_4_31_era_difference_reported(tmp_path, capsys):
    """A base tokenizer with legacy: false (as Vicuna v1.5 ships): the converted tokenizer reproduces the original
    code's pin (transformers 4.37.2: no dummy prefix after a mid-prompt </s>), so the processor check passes on
    every prompt, two-turn included; the 4.31-era difference after </s> is reported as a WARN (tokenizer_era),
    never a FAIL. The converter says what it reproduces."""
    from fixtures.build import build, sample_images, sample_prompts
    from verify.api import verify_repo

    fx = build(tmp_path / "fx")  # its own: its tokenizer_config.json is changed below
    cfg_path = fx.text_model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["legacy"] = False
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert run_convert(fx, tmp_path / "out") == 0
    assert "legacy is false" in capsys.readouterr().out
    prompts = [p for p in sample_prompts() if p["name"] in ("wide_colour", "image_then_space", "two_turn")]
    report = verify_repo(
        tmp_path / "out", prompts=prompts, images=sample_images(), progress=False, only=["processor", "tokenizer_era"]
    )
    assert report.get("processor").status == "PASS", report.table()
    era = report.get("tokenizer_era")
    assert report.passed and era.status == "WARN" and era.numbers["4.31.0"]["first"][0] == "two_turn", report.table()
