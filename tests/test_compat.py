"""The transformers-version matrix (``python -m verify.compat``).

Fast tests feed the verdict logic fake probe results. The others run the probe inside the per-version virtual
environments; each takes well under a minute once the environments exist. In CI, ``.ci/run`` creates the
environments (``python -m verify.compat --setup-only``) BEFORE pytest runs, so these tests run there on the cached
environments. Elsewhere a missing environment is created on first use (about 20 s per version with a reachable
package index); when it cannot be created (offline, or ``VIPLLAVA_COMPAT_CREATE=0``) the test is skipped and says why.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from convert.processor import tokenizer_json
from fixtures.build import sample_images, sample_prompts
from verify import compat
from verify.compat import LOGITS_TOL, PIXEL_TOL, Probe, judge, judges
from verify.compat.judges import expand
from verify.compat.probe import _collapse

IMAGE = 997
SEQ = 9
PROMPTS = [
    {"name": "p0", "prompt": "USER: <image>\nWhat? ASSISTANT:", "image": "box"},
    {"name": "p1", "prompt": "USER: Hi? ASSISTANT:", "image": None},
]
EXPECTED = {
    "config.image_token_index": IMAGE,
    "config.image_seq_length": SEQ,
    "config.vision_feature_layers": [-2, -5, -8, -11, 6],
    "processor.patch_size": 14,
    "image_processor.do_pad": True,
}


def _reference() -> Probe:
    rng = np.random.default_rng(0)
    ids0 = np.array([1, 309, 940, 917] + [IMAGE] * SEQ + [917, 13, 958, 345, 311, 940], dtype=np.int64)
    ids1 = np.array([1, 309, 940, 356, 311, 940], dtype=np.int64)
    tok = {
        "class": "Fast",
        "chat": ["USER: <image>\nHi ASSISTANT:"],
        "probes": [
            {
                "text": "<image>\nWhat",
                "ids": [1, IMAGE, 917, 13, 958, 345],
                "tokens": ["<s>", "<image>", "\u2581", "<0x0A>", "W", "hat"],
                "decoded": "\nWhat",
            },
            {
                "text": "<image> What",
                "ids": [1, IMAGE, 917, 356],
                "tokens": ["<s>", "<image>", "\u2581", "\u2581What"],
                "decoded": " What",
            },
        ],
    }
    result = {
        "steps": {
            n: {"ok": True, "seconds": 0.1}
            for n in (
                "model",
                "model_default_attention",
                "tokenizer",
                "tokenizer_slow",
                "processor",
                "recipe",
                "forward",
                "greedy",
                "recipe_forward",
            )
        },
        "errors": {},
        "versions": {"transformers": "9.9.9"},
        "loading_info": {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []},
        "settings": {**EXPECTED, "tokenizer.padding_side": "left"},
        "tokenizer": tok,
        "processor": {"class": "LlavaProcessor", "chat": ["x"], "prompts": []},
    }
    tensors = {
        "own_ids_0": ids0,
        "own_ids_1": ids1,
        "own_pixels_0": rng.standard_normal((1, 3, 42, 42)).astype(np.float32),
        "logits_0": rng.standard_normal((len(ids0), 64)).astype(np.float32),
        "logits_1": rng.standard_normal((len(ids1), 64)).astype(np.float32),
        "greedy_0": np.array([5, 6, 7], dtype=np.int64),
        "greedy_1": np.array([8, 8, 2], dtype=np.int64),
    }
    for k in ("ids_0", "ids_1", "pixels_0"):  # the recipe gives the processor's inputs, and so its logits
        tensors[f"recipe_{k}"] = tensors[f"own_{k}"].copy()
    for k in ("logits_0", "logits_1"):
        tensors[f"recipe_{k}"] = tensors[k].copy()
    return Probe("current", result=result, tensors=tensors)


def _row(edit, version: str = "4.57.6", model_type: str | None = "llama") -> compat.Row:
    ref = _reference()
    p = Probe(version, result=copy.deepcopy(ref.result), tensors={k: v.copy() for k, v in ref.tensors.items()})
    p.result["versions"]["transformers"] = version
    if compat.capabilities(version).collapse:  # what the probe gives there: one <image> per image in the recipe
        p.tensors["recipe_ids_0"] = _collapse(p.tensors["recipe_ids_0"], IMAGE)
    edit(p)
    return judge(p, ref, EXPECTED, PROMPTS, model_type=model_type)


def _nothing(p):
    p.tensors["logits_0"] = p.tensors["logits_0"] + np.float32(2e-6)  # kernel-order noise: inside 1e-5


def _missing_keys(p):
    p.result["loading_info"]["missing_keys"] = [
        f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)
    ]


def _logits_off(p):
    p.tensors["logits_1"] = p.tensors["logits_1"] + np.float32(1e-3)


def _load_error(p):
    p.result["steps"]["model"] = {"ok": False, "seconds": 0.1}
    p.result["steps"]["forward"] = {"ok": False, "seconds": 0.0}
    p.result["errors"]["model"] = "OSError: no file named model.safetensors"
    p.result.pop("loading_info")
    for i in (0, 1):
        p.tensors.pop(f"logits_{i}")


def _setting_ignored(p):
    p.result["settings"]["config.vision_feature_layers"] = [-2]


def _dummy_prefix_dropped(p):
    t = p.result["tokenizer"]["probes"][0]
    t["ids"], t["tokens"] = [1, IMAGE, 13, 958, 345], ["<s>", "<image>", "<0x0A>", "W", "hat"]


def _image_tokens_short(p):
    ids = p.tensors["own_ids_0"]
    p.tensors["own_ids_0"] = np.delete(ids, np.where(ids == IMAGE)[0][0])


def _tokenizer_fails(p):
    p.result["steps"]["tokenizer"] = {"ok": False, "seconds": 0.0}
    p.result["errors"]["tokenizer"] = (
        "ValueError: Tokenizer class TokenizersBackend does not exist or is not currently imported."
    )
    p.result.pop("tokenizer")


def _pixels_off(p):
    p.tensors["own_pixels_0"] = p.tensors["own_pixels_0"] + np.float32(1e-3)


def test_clean_row_passes():
    row = _row(_nothing)
    assert row.passed, row.details
    assert (row.missing, row.unexpected, row.mismatched) == (0, 0, 0)
    assert row.image_tokens == [SEQ] and row.logits_max_diff == pytest.approx(2e-6, rel=0.1)


@pytest.mark.parametrize(
    "edit, column, detail",
    [
        (_missing_keys, "missing", "3 missing keys"),
        (_logits_off, "logits_ok", "logits max |diff| 0.001"),
        (_load_error, "load_ok", "model: OSError"),
        (
            _setting_ignored,
            "settings_ok",
            "reads config.vision_feature_layers = [-2], the files say [-2, -5, -8, -11, 6]",
        ),
        (_dummy_prefix_dropped, "tokenizer_ok", "'<image>\\nWhat' gives ['<0x0A>', 'W'] after <image>"),
        (_image_tokens_short, "image_tokens_ok", "runs of [8] image tokens, expected 1 x 9"),
        (_tokenizer_fails, "tokenizer_ok", "TokenizersBackend does not exist"),
        (_pixels_off, "processor_ok", "pixel_values max |diff| 0.001"),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else None,
)
def test_each_defect_fails_its_row(edit, column, detail):
    row = _row(edit)
    assert not row.passed and row.verdict == "FAIL"
    if column == "missing":
        assert row.missing == 3
    else:
        assert getattr(row, column) is False
    assert any(detail in d for d in row.details), row.details


def _greedy_off(p):
    p.tensors["greedy_1"] = np.array([8, 9, 2], dtype=np.int64)


def _recipe_pixels_off(p):  # e.g. the recipe without the padding: a centre crop instead
    p.tensors["recipe_pixels_0"] = p.tensors["recipe_pixels_0"] + np.float32(1e-3)


def _recipe_logits_off(p):
    p.tensors["recipe_logits_0"] = p.tensors["recipe_logits_0"] + np.float32(1e-3)


def _recipe_expanded_on_old(p):  # image_seq_length <image> tokens where the model expands each one itself
    p.tensors["recipe_ids_0"] = _reference().tensors["own_ids_0"]


def _recipe_one_token_on_new(p):  # one <image> where the model wants the expanded run (4.48+)
    p.tensors["recipe_ids_0"] = _collapse(p.tensors["recipe_ids_0"], IMAGE)


def _processor_refused(p):
    p.result["steps"]["processor"] = {"ok": False, "seconds": 0.0}
    p.result["errors"]["processor"] = (
        "TypeError: LlavaProcessor.__init__() got an unexpected keyword argument 'image_token'"
    )
    p.result.pop("processor")
    for i in (0, 1):
        p.tensors.pop(f"own_ids_{i}")
    p.tensors.pop("own_pixels_0")


def _processor_does_not_pad(p):  # loads, but a CLIP processor centre-crops instead of padding
    p.tensors["own_pixels_0"] = p.tensors["own_pixels_0"] + np.float32(0.5)


@pytest.mark.parametrize(
    "edit, version, detail",
    [
        (_greedy_off, "4.57.6", "greedy tokens of p1: [8, 9, 2], reference [8, 8, 2]"),
        (_recipe_pixels_off, "4.37.2", "recipe: pixel_values max |diff| 0.001"),
        (_recipe_logits_off, "4.45.2", "recipe: logits max |diff| 0.001"),
        (_recipe_expanded_on_old, "4.37.2", "1 <image> became runs of [9], expected 1 x 1"),
        (_recipe_one_token_on_new, "4.48.3", "1 <image> became runs of [1], expected 1 x 9"),
        (_processor_refused, "4.49.0", "processor: TypeError"),
        (_processor_does_not_pad, "5.24.0", "processor: pixel_values max |diff| 0.5"),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else None,
)
def test_each_new_defect_fails_its_row(edit, version, detail):
    row = _row(edit, version)
    assert not row.passed and row.verdict == "FAIL"
    assert any(detail in d for d in row.details), row.details


def test_from_4_49_the_recipe_is_reported_not_required():
    row = _row(_recipe_pixels_off, "4.49.0")
    assert (
        row.passed and not row.recipe_ok and any("not needed on 4.49.0: recipe: pixel_values" in n for n in row.notes)
    ), row.notes
    assert "differs (not needed)" in compat.Matrix("r", _row(_nothing), [row], 1e-5, 0.0).table()


@pytest.mark.parametrize("edit", [_processor_refused, _processor_does_not_pad], ids=["refused", "does_not_pad"])
def test_below_4_49_the_processor_is_a_cannot_and_the_recipe_carries_the_row(edit):
    row = _row(edit, "4.45.2")
    assert row.passed and row.verdict == "PASS" and not row.processor_required and row.recipe_ok, row.details
    assert any("needs transformers 4.49+" in c and "use the recipe" in c for c in row.cannot), row.cannot
    assert any(c.startswith("AutoProcessor: ") for c in row.cannot)
    assert "cannot" in compat.Matrix("r", _row(_nothing), [row], 1e-5, 0.0).table()
    # ... but the recipe failing there fails the row
    assert not _row(lambda p: (edit(p), _recipe_pixels_off(p)), "4.45.2").passed


def test_an_unknown_backbone_is_a_not_applicable_row_that_says_so():
    def no_phi3(p):
        _load_error(p)
        p.result["errors"]["model"] = "KeyError: 'phi3'"

    row = _row(no_phi3, "4.37.2", model_type="phi3")
    assert row.verdict == "N/A" and row.passed and not row.applicable
    assert "does not know phi3 (KeyError: 'phi3')" in row.cannot[0] and "4.41" in row.cannot[0]
    m = compat.Matrix("r", _row(_nothing), [row], 1e-5, 0.0)
    assert m.passed and "not applicable: 4.37.2" in m.table()
    # the same failure where the release knows the backbone is a FAIL
    assert _row(no_phi3, "4.41.2", model_type="phi3").verdict == "FAIL"


def test_default_attention_failing_says_eager():
    def sdpa_refused(p):
        p.result["steps"]["model_default_attention"] = {"ok": False, "seconds": 0.1}
        p.result["errors"]["model_default_attention"] = (
            "ValueError: Phi3ForCausalLM does not support an attention implementation through "
            "torch.nn.functional.scaled_dot_product_attention yet."
        )

    row = _row(sdpa_refused, "4.44.2", model_type="phi3")
    assert row.passed and row.needs_eager is True
    assert any('attn_implementation="eager"' in c for c in row.cannot)
    assert "eager only" in compat.Matrix("r", _row(_nothing), [row], 1e-5, 0.0).table()
    assert _row(_nothing).needs_eager is False


def test_a_dropped_ignore_merges_is_said():
    def dropped(p):
        p.result["tokenizer"]["bpe_options"] = {"type": "BPE", "fuse_unk": False}

    expected = {**EXPECTED, "tokenizer_json.ignore_merges": True}
    ref = _reference()
    p = Probe("4.37.2", result=copy.deepcopy(ref.result), tensors={k: v.copy() for k, v in ref.tensors.items()})
    p.result["versions"].update(transformers="4.37.2", tokenizers="0.15.1")
    p.tensors["recipe_ids_0"] = _collapse(p.tensors["recipe_ids_0"], IMAGE)
    dropped(p)
    row = judge(p, ref, expected, PROMPTS)
    assert row.passed and any("tokenizers 0.15.1 drops the BPE option ignore_merges" in c for c in row.cannot), (
        row.cannot
    )
    p.result["tokenizer"]["bpe_options"]["ignore_merges"] = True
    assert not any("ignore_merges" in c for c in judge(p, ref, expected, PROMPTS).cannot)


def _failing_aspects(edit, version: str) -> set[str]:
    """The aspects whose own judge function (verify/compat/judges.py) fails on a probe with ``edit`` planted."""
    ref = _reference()
    p = Probe(version, result=copy.deepcopy(ref.result), tensors={k: v.copy() for k, v in ref.tensors.items()})
    p.result["versions"]["transformers"] = version
    if compat.capabilities(version).collapse:
        p.tensors["recipe_ids_0"] = _collapse(p.tensors["recipe_ids_0"], IMAGE)
    edit(p)
    cap = compat.capabilities(version)
    load = judges.judge_load(p)
    processor = judges.judge_processor(p, ref, EXPECTED, PROMPTS, cap, version, PIXEL_TOL)
    findings = {
        "run": judges.judge_run(p, cap),
        "load": load,
        "settings": judges.judge_settings(p, ref, EXPECTED),
        "tokenizer": judges.judge_tokenizer(p, ref),
        "bpe_options": judges.judge_bpe_options(p, EXPECTED),
        "logits": judges.judge_logits(p, ref, PROMPTS, load.loaded, LOGITS_TOL),
        "greedy": judges.judge_greedy(p, ref, PROMPTS, load.loaded),
        "recipe": judges.judge_recipe(p, ref, EXPECTED, PROMPTS, cap, version, LOGITS_TOL, PIXEL_TOL),
        "attention": judges.judge_attention(p, load.loaded),
    }
    failing = {name for name, f in findings.items() if not f.ok}
    return failing | ({"processor"} if not (processor.ok and processor.image_tokens_ok) else set())


@pytest.mark.parametrize(
    "edit, version, aspects",
    [
        (_nothing, "4.57.6", set()),
        (_nothing, "4.37.2", set()),
        (_missing_keys, "4.57.6", {"load"}),
        (_load_error, "4.57.6", {"load", "logits", "greedy"}),  # no model: nothing to run either
        (_setting_ignored, "4.57.6", {"settings"}),
        (_dummy_prefix_dropped, "4.57.6", {"tokenizer"}),
        (_tokenizer_fails, "4.57.6", {"tokenizer"}),
        (_image_tokens_short, "4.57.6", {"processor"}),
        (_pixels_off, "4.57.6", {"processor"}),
        (_processor_refused, "4.49.0", {"processor"}),
        (_logits_off, "4.57.6", {"logits"}),
        (_greedy_off, "4.57.6", {"greedy"}),
        (_recipe_pixels_off, "4.37.2", {"recipe"}),
        (_recipe_logits_off, "4.45.2", {"recipe"}),
        (_recipe_one_token_on_new, "4.48.3", {"recipe"}),
    ],
    ids=lambda x: x.__name__.strip("_") if callable(x) else None,
)
def test_each_defect_fails_its_own_aspect_only(edit, version, aspects):
    """One judge function per aspect: a planted defect fails the function of its aspect and no other."""
    assert _failing_aspects(edit, version) == aspects


def test_a_probe_that_could_not_run_fails():
    row = judge(
        Probe("4.51.3", error="environment: pip install transformers==4.51.3 failed: no network"),
        _reference(),
        EXPECTED,
        PROMPTS,
    )
    assert not row.passed and not row.load_ok and row.logits_max_diff is None
    assert "no network" in row.details[0]


def test_same_compares_settings_numerically():
    assert compat.same(1e-05, 1e-5 * (1 + 1e-9)) and compat.same(10000, 10000.0) and compat.same([1, 2], (1, 2))
    assert not compat.same(True, 1) and not compat.same({"a": 1}, {"a": 1, "b": 2}) and not compat.same(1e-5, 1e-6)


def test_usage_errors_exit_2(tmp_path, capsys):
    assert compat.main([str(tmp_path / "nope")]) == 2
    assert compat.main([str(tmp_path), "--versions", "latest"]) == 2
    assert compat.main([]) == 2
    assert "error:" in capsys.readouterr().err


def test_missing_env_without_create_fails(tmp_path, capsys):
    """--no-create on an empty env dir: exit 1 and the reason, no environment made."""
    assert compat.main(["--setup-only", "--no-create", "--envs", str(tmp_path), "--versions", "4.57.6"]) == 1
    assert "no environment" in capsys.readouterr().out
    with pytest.raises(compat.EnvError, match="no environment"):
        compat.ensure_env("4.57.6", tmp_path, create=False)


# ---------------------------------------------------------------------------------------------------------------
# in the per-version environments
# ---------------------------------------------------------------------------------------------------------------
def _env(version: str) -> None:
    """Make sure the environment for ``version`` exists (created when missing), or skip saying why."""
    create = os.environ.get("VIPLLAVA_COMPAT_CREATE", "1") != "0"
    try:
        compat.ensure_env(version, create=create)
    except compat.EnvError as e:
        pytest.skip(
            f"no transformers {version} environment under {compat.default_envs_dir()} and it cannot be created "
            f"({e}); CI creates them with `python -m verify.compat --setup-only` before pytest"
        )


@pytest.fixture(scope="module")
def all_envs():
    for v in compat.VERSIONS:
        _env(v)


def _show(m) -> None:
    print("\n" + m.table())


@pytest.mark.slow  # needs (or builds) the transformers-version venvs (CI runs the slow tier)
def test_matrix_passes_on_the_converted_tiny_repo(converted, all_envs):
    """Acceptance: every listed version loads the converted repo with 0 missing / unexpected / mismatched keys,
    reads every setting, tokenizes and processes like this environment, expands <image> to image_seq_length (9)
    tokens and gives the same logits within 1e-5 (fp32)."""
    m = compat.run_matrix(converted)
    _show(m)
    assert [r.transformers for r in m.rows] == list(compat.VERSIONS)
    for row in [m.reference, *m.rows]:
        assert row.passed and row.applicable, (row.label, row.details)
        assert (row.missing, row.unexpected, row.mismatched) == (0, 0, 0)
        assert row.tokenizer_ok and row.settings_ok and row.greedy_ok and row.recipe_ok
        assert row.logits_max_diff is not None and row.logits_max_diff <= 1e-5
        assert (
            row.recipe_logits_max_diff is not None
            and row.recipe_logits_max_diff <= 1e-5
            and row.recipe_pixel_max_diff <= 1e-5
        )
        if compat.capabilities(row.transformers).processor:  # 4.49+: AutoProcessor pads to square and expands <image>
            assert row.processor_ok and row.image_tokens and set(row.image_tokens) == {SEQ}
        else:  # the row says it cannot, and why
            assert not row.processor_required and any("use the recipe" in c for c in row.cannot), row.cannot
    assert m.passed


@pytest.mark.slow  # needs (or builds) the transformers-version venvs (CI runs the slow tier)
def test_every_version_reads_non_default_settings(converted, tmp_path, all_envs):
    """The settings are READ, not defaulted: with vision_feature_layers, the processor's strategy / extra-token count
    and the image processor's do_pad changed away from their defaults (the expansion stays 9 tokens), the 4.x
    versions read the new values and still give this environment's logits; and the changes did change pixels and
    logits (so agreeing on them means something)."""
    repo = tmp_path / "nondefault"
    shutil.copytree(converted, repo)
    edits = {
        "config.json": {"vision_feature_layers": [-3, -4, -7, -10, 5]},
        "processor_config.json": {"vision_feature_select_strategy": "full", "num_additional_image_tokens": 0},
        "preprocessor_config.json": {"do_pad": False},
    }
    for name, change in edits.items():
        obj = json.loads((repo / name).read_text())
        obj.update(change)
        (repo / name).write_text(json.dumps(obj, indent=2))
    prompts = [p for p in sample_prompts() if p["name"] in ("wide_colour", "text_only")]
    versions = [v for v in compat.VERSIONS if v.startswith("4.") and compat.capabilities(v).processor]  # processor rows
    m = compat.run_matrix(repo, versions=versions, prompts=prompts, keep=tmp_path / "work")
    _show(m)
    assert m.passed, [(r.label, r.details) for r in m.rows if not r.passed]
    for row in m.rows:  # each version's reading, seen in the JSON too
        assert row.settings_ok and set(row.image_tokens) == {SEQ}

    # ... and the changes matter: this environment, on the unchanged repo, gives other pixels and other logits
    import torch
    from transformers import AutoProcessor, VipLlavaForConditionalGeneration

    feed = np.load(tmp_path / "work" / "current" / "tensors.npz")
    base = VipLlavaForConditionalGeneration.from_pretrained(
        str(converted), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = base(
            input_ids=torch.from_numpy(feed["own_ids_0"])[None], pixel_values=torch.from_numpy(feed["own_pixels_0"])
        ).logits[0]
    assert float(np.max(np.abs(logits.numpy() - feed["logits_0"]))) > 1e-3  # vision_feature_layers was read
    pixels = AutoProcessor.from_pretrained(str(converted))(
        text=prompts[0]["prompt"], images=[sample_images()["wide"]], return_tensors="pt"
    )["pixel_values"].numpy()
    assert pixels.shape == feed["own_pixels_0"].shape and not np.allclose(
        pixels, feed["own_pixels_0"]
    )  # do_pad was read


def _saved_by_5x(converted: Path, out: Path, from_config: bool) -> None:
    import torch
    from transformers import AutoProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration

    loaded = VipLlavaForConditionalGeneration.from_pretrained(str(converted), dtype=torch.float32)
    if from_config:  # what a converter written against 5.x does: build the model, fill it, save it
        model = VipLlavaForConditionalGeneration(VipLlavaConfig.from_pretrained(str(converted)))
        model.load_state_dict(loaded.state_dict())
    else:
        model = loaded
    model.save_pretrained(str(out))
    if from_config:  # our hand-written tokenizer and processor files, so only the weights' layout is on trial
        for f in converted.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "preprocessor", "processor", "chat_template")):
                shutil.copyfile(f, out / f.name)
    else:
        AutoProcessor.from_pretrained(str(converted)).save_pretrained(str(out))


def _vision_keys(converted: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), "pt") as h:
        return sum(k.startswith("vision_tower.") for k in h.keys())


@pytest.mark.slow  # needs (or builds) the transformers-version venvs (CI runs the slow tier)
def test_matrix_catches_5x_save_pretrained_repo(converted, tmp_path):
    """The measured trap. The converted repo loaded in this environment (transformers 5.x) and written back with
    plain ``save_pretrained`` (model + processor) FAILS the 4.57.6 row: its tokenizer files name
    ``TokenizersBackend``, which 4.x does not have."""
    _env("4.57.6")
    out = tmp_path / "saved-by-5x"
    _saved_by_5x(converted, out, from_config=False)
    report = tmp_path / "compat.json"
    assert compat.main([str(out), "--versions", "4.57.6", "--json", str(report)]) == 1  # the CLI's verdict
    data = json.loads(report.read_text())
    row = data["rows"][0]
    assert row["verdict"] == "FAIL" and not data["passed"] and data["reference"]["verdict"] == "PASS"
    assert not row["tokenizer_ok"] and not row["processor_ok"]
    assert any("TokenizersBackend" in d for d in row["details"]), row["details"]
    # measured: after a load from the canonical layout, 5.x writes that layout back; the keys themselves load
    assert (row["missing"], row["unexpected"], row["mismatched"]) == (0, 0, 0)


@pytest.mark.slow  # needs (or builds) the transformers-version venvs (CI runs the slow tier)
def test_matrix_catches_5x_layout_from_a_fresh_model(converted, tmp_path):
    """The 199-missing-keys trap: a model BUILT in 5.x (from the config, weights loaded in memory) is saved with the
    vision tower as ``vision_tower.*`` (no ``vision_model.``); 4.57.6 then reports every vision key missing
    (199 on the tiny fixture: 12 layers x 16 + 7) and runs a random vision tower."""
    _env("4.57.6")
    out = tmp_path / "fresh-5x"
    _saved_by_5x(converted, out, from_config=True)
    prompts = [p for p in sample_prompts() if p["name"] == "wide_colour"]
    m = compat.run_matrix(out, versions=["4.57.6"], prompts=prompts)
    _show(m)
    row = m.rows[0]
    n = _vision_keys(converted)
    assert n == 12 * 16 + 7 == 199
    assert not row.passed
    assert row.missing == n and row.unexpected == n
    assert row.logits_max_diff > 1e-2  # the random vision tower shows in the logits
    assert m.reference.passed  # 5.x itself reads both layouts


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json for tokenizers 0.15+ (transformers 4.37-4.44)
# ---------------------------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MERGE_TEXTS = (
    compat.TOKEN_PROBES
    + [p["prompt"] for p in sample_prompts()]
    + [
        "Hello, world! 123 4567 don't   x\t\ty \u0120\u0120 \u2581\u2581 <image><image> <|user|>\n<|end|><|assistant|>",
        "the quick brown fox jumps over the lazy dog " * 5,
    ]
)


def _tokenizer_files(converted: Path) -> dict[str, str]:
    """tokenizer.json text per backbone: the converted Vicuna repo's, and the Llama-3 / Phi-3 fixtures' rewritten by
    :func:`tokenizer_json` (what the converter writes for them)."""
    from tokenizers import Tokenizer

    out = {"vicuna": (converted / "tokenizer.json").read_text(encoding="utf-8")}
    for b in ("llama3", "phi3"):
        out[b] = tokenizer_json(Tokenizer.from_file(str(FIXTURES / b / "tokenizer.json")))
    return out


def test_tokenizer_json_writes_merges_as_strings_with_the_same_ids(converted):
    from tokenizers import Tokenizer

    files = _tokenizer_files(converted)
    for name, text in files.items():
        merges = json.loads(text)["model"]["merges"]
        assert merges and all(isinstance(m, str) and m.count(" ") == 1 for m in merges), name
        as_pairs = Tokenizer.from_str(text).to_str()  # tokenizers 0.23 reads the strings and writes pairs back
        assert isinstance(json.loads(as_pairs)["model"]["merges"][0], list)
        a, b = Tokenizer.from_str(text), Tokenizer.from_str(as_pairs)
        assert [a.encode(t).ids for t in MERGE_TEXTS] == [b.encode(t).ids for t in MERGE_TEXTS], name
    base = Tokenizer.from_file(str(FIXTURES / "phi3" / "tokenizer.json"))
    assert [base.encode(t).ids for t in MERGE_TEXTS] == [
        Tokenizer.from_str(files["phi3"]).encode(t).ids for t in MERGE_TEXTS
    ]


def test_tokenizer_json_keeps_pairs_when_a_piece_has_a_space():
    from tokenizers import Tokenizer, models

    vocab = {"a": 0, " ": 1, "b": 2, "a ": 3, "ab": 4}
    tok = Tokenizer(models.BPE(vocab, [("a", " "), ("a", "b")]))
    text = tokenizer_json(tok)
    assert json.loads(text)["model"]["merges"] == [["a", " "], ["a", "b"]]
    assert Tokenizer.from_str(text).encode("a ab").ids == tok.encode("a ab").ids == [3, 4]


@pytest.mark.slow  # needs (or builds) the transformers-version venvs (CI runs the slow tier)
def test_tokenizers_0_15_reads_the_tokenizer_json_with_the_same_ids(converted, tmp_path):
    """The original's pin (transformers 4.37.2 + tokenizers 0.15.x), in its environment: it reads the converted
    tokenizer.json of every backbone and gives tokenizers 0.23's ids; the pairs form (what tokenizers 0.23 itself
    writes) is refused there, so the check can fail."""
    import subprocess

    from tokenizers import Tokenizer

    _env("4.37.2")
    python = compat.env_python(compat.env_path("4.37.2", compat.default_envs_dir()))
    files = _tokenizer_files(converted)
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(text, encoding="utf-8")
    paths["pairs"] = tmp_path / "pairs.json"
    paths["pairs"].write_text(Tokenizer.from_str(files["vicuna"]).to_str(), encoding="utf-8")
    (tmp_path / "texts.json").write_text(json.dumps(MERGE_TEXTS))
    code = (
        "import json, sys, tokenizers\nfrom tokenizers import Tokenizer\nout = {'version': tokenizers.__version__}\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "for name, path in json.loads(sys.argv[2]).items():\n"
        "    try:\n        t = Tokenizer.from_file(path); out[name] = [t.encode(x).ids for x in texts]\n"
        "    except Exception as e:\n        out[name] = repr(e)\n"
        "print(json.dumps(out))"
    )
    p = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            code,
            str(tmp_path / "texts.json"),
            json.dumps({k: str(v) for k, v in paths.items()}),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    old = json.loads(p.stdout.strip().splitlines()[-1])
    assert old["version"].startswith("0.15.")
    for name, text in files.items():
        assert old[name] == [Tokenizer.from_str(text).encode(t).ids for t in MERGE_TEXTS], name
    assert isinstance(old["pairs"], str) and "did not match" in old["pairs"]


# ---------------------------------------------------------------------------------------------------------------
# the card's recipe for releases without a pad-to-square processor, run as printed
# ---------------------------------------------------------------------------------------------------------------
def _recipe_snippet(repo: Path, image: Path) -> str:
    from convert.model_card import model_card

    manifest = json.loads((repo / "conversion.json").read_text())
    blocks = re.findall(r"```python\n(.*?)```", model_card(manifest, {"checks": []}, None), re.S)
    assert len(blocks) == 2 and "CLIPImageProcessor" in blocks[1]
    code = blocks[1]
    for a, b in (
        ('"path/to/this/repo"', json.dumps(str(repo))),
        ('"image.png"', json.dumps(str(image))),
        ("max_new_tokens=200", "max_new_tokens=4"),
        ("torch.bfloat16", "torch.float32"),
        ("torch.float16", "torch.float32"),
    ):
        assert a in code or a.startswith("torch."), a
        code = code.replace(a, b)
    return code


@pytest.mark.slow  # needs (or builds) the transformers-version venvs (CI runs the slow tier)
@pytest.mark.parametrize("version", ["4.37.2", "4.48.3"])
def test_the_cards_recipe_gives_the_processors_inputs_and_tokens(converted, tmp_path, version):
    """The recipe on the model card, run as printed (fp32, 4 tokens) in the 4.37.2 environment (one <image>, the
    model expands it) and the 4.48.3 one (image_seq_length of them): pixel_values equal transformers 5.x's
    AutoProcessor (pad to square), the ids are the processor's (counting each <image> as image_seq_length), and the
    greedy tokens are the same."""
    import torch
    from transformers import AutoProcessor, VipLlavaForConditionalGeneration

    _env(version)
    python = compat.env_python(compat.env_path(version, compat.default_envs_dir()))
    image = Path(__file__).resolve().parent.parent / "fixtures" / "images" / "wide.png"
    code = _recipe_snippet(converted, image) + (
        "\nimport numpy as np\nnp.savez(OUT, ids=inputs['input_ids'][0].numpy(), pixels=pixel_values.float().numpy(), "
        "new=output[0][inputs['input_ids'].shape[1]:].numpy())\n"
    )
    out = tmp_path / "recipe.npz"
    p = subprocess.run(
        [str(python), "-I", "-c", f"OUT = {str(out)!r}\n" + code],
        capture_output=True,
        text=True,
        env=compat.probe_env(),
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = np.load(out)

    cfg = json.loads((converted / "config.json").read_text())
    from PIL import Image

    processor = AutoProcessor.from_pretrained(str(converted))
    prompt = re.search(r"^prompt = (.*)\.format", code, re.M).group(1)
    text = json.loads(prompt).format(question="What is inside the red box?")
    with Image.open(image) as im:
        enc = processor(text=text, images=[im.convert("RGB")], return_tensors="pt")
    model = VipLlavaForConditionalGeneration.from_pretrained(str(converted), dtype=torch.float32).eval()
    want = model.generate(**enc, max_new_tokens=4, do_sample=False)[0, enc["input_ids"].shape[1] :].numpy()
    ids = got["ids"]
    if compat.capabilities(version).collapse:
        assert (ids == cfg["image_token_index"]).sum() == 1
        ids = expand(ids, cfg["image_token_index"], cfg["image_seq_length"])
    assert ids.tolist() == enc["input_ids"][0].tolist()
    assert float(np.abs(got["pixels"] - enc["pixel_values"].numpy()).max()) <= compat.PIXEL_TOL
    assert got["new"].tolist() == want.tolist()


def test_the_card_says_what_older_releases_cannot_per_backbone():
    from convert.model_card import model_card

    cards = {b: model_card({"settings": {"backbone": b}}, {"checks": []}, None) for b in ("vicuna", "llama3", "phi3")}
    for b, card in cards.items():
        section = card[card.index("## Proven transformers versions") : card.index("## Usage")]
        assert "LlavaImageProcessor" in section and "use the recipe" in section, b
        assert ("4.37.2" in section) == (b != "phi3")  # the recipe's measured versions start at the backbone's first
        assert ('attn_implementation=\\"eager\\"' in section or 'attn_implementation="eager"' in section) == (
            b == "phi3"
        ), b
        assert ("ignore_merges" in section) == (b == "llama3"), b
        recipe = re.findall(r"```python\n(.*?)```", card, re.S)[1]
        assert ('attn_implementation="eager"' in recipe) == (b == "phi3"), b
    assert (
        "On transformers 4.41 to 4.44, load with" in cards["phi3"]
        and "needs transformers 4.41 or later" in cards["phi3"]
    )
