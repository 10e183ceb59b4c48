"""verify/compat/probe.py, the probe that runs inside each transformers environment: its steps, run here in-process
on the converted tiny repo (the matrix tests in tests/test_compat.py run it as a subprocess in every environment)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from verify.compat import probe
from verify.compat.probing import TOKEN_PROBES, probe_job

PROMPTS = [
    {"name": "boxed", "prompt": "USER: <image>\nWhat is in the red box? ASSISTANT:", "image": "wide"},
    {"name": "text", "prompt": "USER: Hi? ASSISTANT:", "image": None},
]


def _run(converted, tmp_path, image_path) -> probe.Run:
    job = probe_job(converted, PROMPTS, {"wide": image_path}, None, tmp_path, collapse=False, new_tokens=2)
    run = probe.Run(job)
    run.dtype_kw = "dtype"  # what start() picks on transformers 5.x (start() itself sets torch's threads: not here)
    return run


def _wide(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (60, 30), (200, 10, 10)).save(path)
    return path


def test_the_steps_give_what_the_judges_read(converted, tmp_path):
    run = _run(converted, tmp_path, _wide(tmp_path))
    model = run.step("model", probe.load_model, run)
    probe.tokenizers(run)
    run.result["processor"] = run.step("processor", probe.load_processor, run)
    run.step("recipe", probe.recipe, run)
    run.step("forward", probe.forward, run, model)
    run.step("recipe_forward", probe.recipe_forward, run, model)
    assert run.result["errors"] == {}, run.result["errors"]
    assert all(s["ok"] for s in run.result["steps"].values())
    assert run.result["loading_info"]["missing_keys"] == [] and run.settings["model.dtype"] == "float32"
    assert len(run.result["tokenizer"]["probes"]) == len(run.job["token_probes"]) > len(TOKEN_PROBES)
    seq = run.job["image_seq_length"]
    assert int((run.tensors["own_ids_0"] == run.job["image_token_id"]).sum()) == seq
    # the recipe (pad to square, CLIPImageProcessor, expanded <image>) gives the processor's inputs and logits
    assert run.tensors["recipe_ids_0"].tolist() == run.tensors["own_ids_0"].tolist()
    assert float(np.abs(run.tensors["recipe_pixels_0"] - run.tensors["own_pixels_0"]).max()) <= 1e-5
    assert float(np.abs(run.tensors["recipe_logits_1"] - run.tensors["logits_1"]).max()) <= 1e-5
    assert "own_pixels_1" not in run.tensors  # the text-only prompt has no image


def test_a_failing_step_is_recorded_and_the_others_still_run(converted, tmp_path):
    run = _run(converted, tmp_path, tmp_path / "no-such-image.png")
    assert run.step("processor", probe.load_processor, run) is None
    assert run.result["errors"]["processor"].startswith("FileNotFoundError: ")
    assert "no-such-image.png" in run.result["tracebacks"]["processor"]
    probe.tokenizers(run)  # independent of the processor: still runs
    assert run.result["steps"]["tokenizer"]["ok"] and run.result["tokenizer"]["probes"]
    model = run.step("model", probe.load_model, run)
    assert run.step("forward", probe.forward, run, model) is None  # no inputs: the processor failed
    assert run.result["errors"]["forward"] == "RuntimeError: no input_ids for prompt 0 (the processor step failed)"
    assert [name for name, s in run.result["steps"].items() if not s["ok"]] == ["processor", "forward"]


def test_collapse_keeps_one_token_per_run():
    ids = np.array([1, 9, 9, 9, 2, 9, 3, 9, 9], dtype=np.int64)
    assert probe._collapse(ids, 9).tolist() == [1, 9, 2, 9, 3, 9]
    assert probe._collapse(np.array([1, 2], dtype=np.int64), 9).tolist() == [1, 2]


@pytest.mark.parametrize("size", [(6, 2), (2, 6), (4, 4)])
def test_pad_to_square_centres_the_image_on_the_mean_colour(size):
    image = Image.new("RGB", size, (255, 255, 255))
    square = probe.pad_to_square(image, [10, 20, 30])
    side = max(size)
    assert square.size == (side, side)
    pixels = np.asarray(square)
    white = np.all(pixels == 255, axis=-1)
    assert int(white.sum()) == size[0] * size[1]
    if size[0] != size[1]:
        assert tuple(pixels[0, 0]) == (10, 20, 30)
        rows, cols = np.nonzero(white)
        assert rows.min() == (side - size[1]) // 2 and cols.min() == (side - size[0]) // 2
