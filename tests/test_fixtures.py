"""Fast tests of the tiny original-format fixture builder (fixtures/*, verify/tiny.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import build as fb
from verify import tiny
from verify.tiny import TinySpec

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
SPACE = "\u2581"


# ------------------------------------------------------------------------------------------
# helpers / shared fixtures
# ------------------------------------------------------------------------------------------

def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_original(directory: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.bin")):
        part = torch.load(f, map_location="cpu", weights_only=True)
        assert not set(part) & set(sd), "key in two shards"
        sd.update(part)
    for f in sorted(directory.glob("*.safetensors")):
        from safetensors.torch import load_file

        part = load_file(str(f))
        assert not set(part) & set(sd), "key in two shards"
        sd.update(part)
    return sd


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> fb.FixturePaths:
    return fb.build(tmp_path_factory.mktemp("fx") / "a")


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return tiny.original_state_dict(TinySpec(), seed=0)


@pytest.fixture(scope="module")
def towers(sd):
    return tiny.build_reference_modules(TinySpec(), sd)


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------

def test_tokenizer_pieces_and_space_newline_property():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    assert sp.get_piece_size() == 997
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    space = sp.piece_to_id(SPACE)
    assert space != sp.unk_id() and sp.id_to_piece(space) == SPACE
    nl = sp.piece_to_id("<0x0A>")
    assert sp.encode("\nWhat")[:2] == [space, nl]
    # the words of the prompts are real pieces, not byte soup
    assert "<0x" not in "".join(sp.encode("What is inside the red box?", out_type=str))


def test_tokenizer_and_corpus_are_regenerable():
    from fixtures import make_tokenizer as mt

    corpus = ("\n".join(mt.corpus_lines()) + "\n").encode("utf-8")
    assert (FIXTURES / "text" / "corpus.txt").read_bytes() == corpus
    assert mt.train(FIXTURES / "text" / "corpus.txt") == (FIXTURES / "tokenizer.model").read_bytes()


def test_text_model_dir_loads_with_transformers(built):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built.text_model)
    sp = spm.SentencePieceProcessor(model_file=str(built.text_model / "tokenizer.model"))
    text = "A chat between a curious human and an artificial intelligence assistant."
    assert tok(text).input_ids == [1] + sp.encode(text)
    assert "tokenizer.model" not in os.listdir(built.original)


# ------------------------------------------------------------------------------------------
# key layout and values
# ------------------------------------------------------------------------------------------

def test_state_dict_matches_key_shapes(sd):
    shapes = tiny.original_key_shapes(TinySpec())
    assert list(sd) == list(shapes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert len(sd) == 229


def test_key_layout_is_the_original_one(sd):
    spec = TinySpec()
    keys = set(sd)
    v = "model.vision_tower.vision_tower.vision_model."
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.1.self_attn.rotary_emb.inv_freq", "model.layers.1.mlp.gate_proj.weight",
              v + "embeddings.class_embedding", v + "embeddings.patch_embedding.weight",
              v + "embeddings.position_embedding.weight", v + "embeddings.position_ids",
              v + "pre_layrnorm.bias", v + "post_layernorm.weight",
              v + f"encoder.layers.{spec.vision_layers - 1}.self_attn.out_proj.bias",
              v + "encoder.layers.0.mlp.fc2.bias", v + "encoder.layers.0.layer_norm2.weight",
              "model.mm_projector.clip_layernorm.weight", "model.mm_projector.final_linear.0.bias",
              "model.mm_projector.final_linear.2.weight"):
        assert k in keys, k
    assert sd["model.mm_projector.clip_layernorm.weight"].shape == (5 * spec.vision_hidden,)
    assert sd["model.mm_projector.final_linear.0.weight"].shape == (spec.text_hidden, 5 * spec.vision_hidden)
    assert sd[v + "embeddings.position_ids"].shape == (1, spec.num_patches + 1)
    assert not any(k.startswith("model.vision_tower.vision_tower.encoder") for k in keys)
    no_legacy = tiny.original_key_shapes(TinySpec(legacy_buffers=False))
    assert set(sd) - set(no_legacy) == {k for k in sd if tiny.is_legacy_buffer(k)}
    assert len(sd) - len(no_legacy) == spec.text_layers + 1


def test_dtypes_and_buffer_values(sd):
    spec = TinySpec()
    for k, t in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            assert t.dtype == torch.float32
            d = spec.text_head_dim
            ref = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
            torch.testing.assert_close(t, ref, rtol=0, atol=0)
        elif k.endswith("embeddings.position_ids"):
            assert t.dtype == torch.int64 and t.tolist() == [list(range(spec.num_patches + 1))]
        else:
            assert t.dtype == torch.bfloat16, k
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * 2, k


def test_every_tensor_is_non_trivial(sd):
    for k, t in sd.items():
        if tiny.is_legacy_buffer(k):
            continue
        t = t.float()
        assert t.std() > 0.01, k
        if k.endswith(".bias"):
            assert t.abs().mean() > 0.05, k  # biases are NOT zero: zeroing one must show
        if k.endswith(".weight") and t.dim() == 1:
            assert (t - 1).abs().mean() > 0.05, k  # norm weights are not all ones


def test_values_are_seeded(sd):
    again = tiny.original_state_dict(TinySpec(), seed=0)
    other = tiny.original_state_dict(TinySpec(), seed=1)
    for k in sd:
        assert torch.equal(sd[k], again[k]), k
        if not tiny.is_legacy_buffer(k):
            assert not torch.equal(sd[k], other[k]), k


def test_key_shapes_scale_to_7b_without_allocation():
    spec = TinySpec(vocab_size=32000, text_hidden=4096, text_intermediate=11008, text_layers=32,
                    text_heads=32, text_kv_heads=32, vision_hidden=1024, vision_intermediate=4096,
                    vision_layers=24, vision_heads=16, image_size=336, patch_size=14,
                    max_position_embeddings=4096)
    shapes = tiny.original_key_shapes(spec)
    assert shapes["model.mm_projector.final_linear.0.weight"] == (4096, 5120)
    assert shapes["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] == (1, 577)
    assert shapes["model.layers.31.self_attn.rotary_emb.inv_freq"] == (64,)
    n_params = sum(math.prod(s) for k, s in shapes.items() if not tiny.is_legacy_buffer(k))
    assert 7.0e9 < n_params < 7.2e9


# ------------------------------------------------------------------------------------------
# forward sanity
# ------------------------------------------------------------------------------------------

def test_tiny_forward_is_finite_and_informative(sd):
    rep = tiny.sanity_report(TinySpec(), sd)
    assert rep["finite"]
    assert rep["logits_std"] > 0.1
    assert rep["hidden_states"] == TinySpec().vision_layers + 1
    assert rep["feature_min_pairwise_diff"] > 0.1  # the 5 feature layers differ from each other


@torch.no_grad()
def test_planted_defects_change_outputs(sd):
    spec = TinySpec()
    ids = torch.tensor([[1, 50, 300, 917, 13, 600, 42]])
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(3))

    def run(state):
        llama, clip = tiny.build_reference_modules(spec, state)
        hs = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        return llama(input_ids=ids).logits, torch.cat([hs[i] for i in tiny.FEATURE_LAYERS], -1)

    base_logits, base_feats = run(sd)

    swapped = dict(sd)
    for name in [k[len("model.layers.0."):] for k in sd if k.startswith("model.layers.0.")]:
        swapped["model.layers.0." + name], swapped["model.layers.1." + name] = (
            sd["model.layers.1." + name], sd["model.layers.0." + name])
    assert (run(swapped)[0] - base_logits).abs().max() > 0.1

    zeroed = dict(sd)
    k = "model.vision_tower.vision_tower.vision_model.encoder.layers.3.layer_norm1.bias"
    zeroed[k] = torch.zeros_like(sd[k])
    assert (run(zeroed)[1] - base_feats).abs().max() > 0.1

    norm = dict(sd)
    norm["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
    assert (run(norm)[0] - base_logits).abs().max() > 0.1


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------

def test_configs(built):
    spec = TinySpec()
    orig = json.loads((built.original / "config.json").read_text())
    assert orig == tiny.original_config(spec)
    assert orig["rms_norm_eps"] == 1e-5 and orig["model_type"] == "llava_llama"
    assert orig["mm_hidden_size"] == 5 * spec.vision_hidden and orig["vocab_size"] == 997
    base = json.loads((built.text_model / "config.json").read_text())
    assert base["rms_norm_eps"] == 1e-6  # deliberately different from the original
    clip = json.loads((built.vision_model / "config.json").read_text())
    assert clip["model_type"] == "clip" and clip["vision_config"]["num_hidden_layers"] == spec.vision_layers
    from transformers import CLIPVisionConfig

    vc = CLIPVisionConfig.from_pretrained(built.vision_model)
    assert (vc.hidden_size, vc.image_size, vc.patch_size, vc.hidden_act) == (32, 42, 14, "quick_gelu")
    pre = json.loads((built.vision_model / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 42} and pre["crop_size"] == {"height": 42, "width": 42}
    assert pre["resample"] == 3 and pre["do_center_crop"] and pre["do_convert_rgb"]
    tc = json.loads((built.text_model / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizer" and tc["pad_token"] is None and tc["legacy"] is True

    cfg = tiny.vipllava_config(spec)
    assert cfg.text_config.vocab_size == 1024 and cfg.image_token_index == 997
    assert cfg.text_config.pad_token_id == 998 and cfg.text_config.rms_norm_eps == 1e-5
    assert cfg.pad_token_id == 998
    assert tiny.vipllava_config(spec, image_token_index=5, pad_token_id=7).text_config.pad_token_id == 7
    assert list(cfg.vision_feature_layer) == [-2, -5, -8, -11, 6]
    assert cfg.image_seq_length == 9 and cfg.projector_layernorm_eps == 1e-5
    assert tiny.padded_vocab_size(32000) == 32064 and tiny.padded_vocab_size(62) == 64
    assert tiny.padded_vocab_size(63) == 128


def test_spec_validation():
    with pytest.raises(ValueError):
        TinySpec(vision_layers=9)  # -11 is not a valid hidden-state index with 10 states
    with pytest.raises(ValueError):
        TinySpec(image_size=40)


# ------------------------------------------------------------------------------------------
# files on disk
# ------------------------------------------------------------------------------------------

def test_build_is_byte_identical(built, tmp_path):
    again = fb.build(tmp_path / "b")
    assert _tree_bytes(built.root) == _tree_bytes(again.root)


def test_build_is_byte_identical_across_processes(built, tmp_path):
    code = f"from fixtures.build import build; build({str(tmp_path / 'c')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    assert _tree_bytes(built.root) == _tree_bytes(tmp_path / "c")


def test_build_layout_and_index(built, sd):
    files = sorted(os.listdir(built.original))
    assert files == ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json"]
    index = json.loads((built.original / "pytorch_model.bin.index.json").read_text())
    wm = index["weight_map"]
    assert list(wm) == sorted(wm) and set(wm) == set(sd)
    loaded = {}
    for shard in sorted(set(wm.values())):
        part = torch.load(built.original / shard, map_location="cpu", weights_only=True)
        assert {k for k, f in wm.items() if f == shard} == set(part)  # every key exactly once
        assert not set(part) & set(loaded)
        loaded.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    shard1 = torch.load(built.original / "pytorch_model-00001-of-00002.bin", weights_only=True)
    assert all(k in shard1 for k in sd if k.startswith("model.layers."))  # text layers in shard 1
    for k, t in loaded.items():
        assert t.dtype == sd[k].dtype and torch.equal(t, sd[k]), k
        if not tiny.is_legacy_buffer(k):
            assert t.dtype == torch.bfloat16
    assert sorted(os.listdir(built.text_model)) == ["config.json", "special_tokens_map.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    assert sorted(os.listdir(built.vision_model)) == ["config.json", "preprocessor_config.json"]


def test_safetensors_and_single_file(tmp_path, sd):
    p = fb.build(tmp_path / "st", fmt="safetensors")
    assert sorted(os.listdir(p.original)) == ["config.json", "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    loaded = _load_original(p.original)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    index = json.loads((p.original / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())

    one = fb.build(tmp_path / "one", shards=1, fmt="safetensors")
    assert sorted(os.listdir(one.original)) == ["config.json", "model.safetensors"]
    one_bin = fb.build(tmp_path / "onebin", shards=1)
    assert sorted(os.listdir(one_bin.original)) == ["config.json", "pytorch_model.bin"]
    assert set(_load_original(one_bin.original)) == set(sd)

    three = fb.build(tmp_path / "three", shards=3, seed=5)
    assert len(list(three.original.glob("pytorch_model-0000?-of-00003.bin"))) == 3
    other = _load_original(three.original)
    assert not torch.equal(other["lm_head.weight"], sd["lm_head.weight"])


def test_build_refuses_non_empty_root(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "junk").write_text("x")
    with pytest.raises(FileExistsError):
        fb.build(tmp_path / "x")


def test_split_into_shards_properties():
    sizes = [(str(i), s) for i, s in enumerate([10, 0, 5, 1000, 1, 1, 7, 0])]
    for n in range(1, len(sizes) + 1):
        groups = fb.split_into_shards(sizes, n)
        assert len(groups) == n and all(groups)
        assert [k for g in groups for k in g] == [k for k, _ in sizes]
    with pytest.raises(ValueError):
        fb.split_into_shards(sizes, 0)


def test_demo_fixture_is_cached_and_rebuilt_when_broken(tmp_path, monkeypatch):
    monkeypatch.setenv("VIPLLAVA_HARNESS_CACHE", str(tmp_path))
    p = fb.demo_fixture()
    assert p.root == tmp_path / "tiny-fixture-v1"
    shard = p.original / "pytorch_model-00001-of-00002.bin"
    mtime = shard.stat().st_mtime_ns
    assert fb.demo_fixture() == p and shard.stat().st_mtime_ns == mtime  # reused
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: must be rebuilt
    p2 = fb.demo_fixture()
    assert p2 == p and fb._is_complete(p.root, fb._builder_fingerprint())
    assert torch.load(shard, weights_only=True)
    assert [q.name for q in tmp_path.iterdir()] == ["tiny-fixture-v1"]  # no temp leftovers


# ------------------------------------------------------------------------------------------
# prompts and images
# ------------------------------------------------------------------------------------------

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_sample_prompts():
    prompts = fb.sample_prompts()
    images = fb.sample_images()
    names = [p["name"] for p in prompts]
    assert len(names) == len(set(names))
    for p in prompts:
        assert set(p) == {"name", "prompt", "image"}
        assert p["prompt"].startswith(SYSTEM + " USER: ") and p["prompt"].endswith(" ASSISTANT:")
        assert (p["image"] is None) == ("<image>" not in p["prompt"])
        assert p["image"] is None or p["image"] in images
        assert p["prompt"].count("<image>") <= 1
    used = {p["image"] for p in prompts}
    assert {"square", "wide", "tall", "odd", "box", None} <= used
    assert any("<image>\nWhat is inside the red box?" in p["prompt"] for p in prompts)
    assert any("<image> What" in p["prompt"] for p in prompts)  # space after <image>
    two = [p for p in prompts if "</s>USER: " in p["prompt"]]  # llava_v1: "</s>" then the next turn
    assert two and all(p["prompt"].count("ASSISTANT:") == 2 for p in two)


def test_sample_images():
    images = fb.sample_images()
    sizes = {k: v.size for k, v in images.items()}
    assert sizes == {"square": (64, 64), "wide": (80, 48), "tall": (30, 70), "odd": (37, 53), "box": (72, 56)}
    for im in images.values():
        assert im.mode == "RGB"
        assert len(im.getcolors(maxcolors=1 << 16) or []) > 50  # varied content
    from fixtures import make_images

    for name, im in make_images.images().items():
        assert im.tobytes() == images[name].tobytes(), name
    box = images["box"]
    assert box.getpixel((36, 30)) == (255, 0, 0)  # the red outline is there


def test_committed_fixture_size_is_small():
    committed = [FIXTURES / "tokenizer.model", FIXTURES / "prompts.json", *FIXTURES.glob("images/*.png"),
                 *FIXTURES.glob("text/*")]
    assert sum(p.stat().st_size for p in committed) < 300_000
