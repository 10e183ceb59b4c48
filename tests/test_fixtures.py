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
def built(tiny_fixture) -> fb.FixturePaths:
    """The session's tiny Vicuna fixture (``fb.build`` with its defaults)."""
    return tiny_fixture("vicuna")


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
    for k in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.rotary_emb.inv_freq",
        "model.layers.1.mlp.gate_proj.weight",
        v + "embeddings.class_embedding",
        v + "embeddings.patch_embedding.weight",
        v + "embeddings.position_embedding.weight",
        v + "embeddings.position_ids",
        v + "pre_layrnorm.bias",
        v + "post_layernorm.weight",
        v + f"encoder.layers.{spec.vision_layers - 1}.self_attn.out_proj.bias",
        v + "encoder.layers.0.mlp.fc2.bias",
        v + "encoder.layers.0.layer_norm2.weight",
        "model.mm_projector.clip_layernorm.weight",
        "model.mm_projector.final_linear.0.bias",
        "model.mm_projector.final_linear.2.weight",
    ):
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
    spec = TinySpec(
        vocab_size=32000,
        text_hidden=4096,
        text_intermediate=11008,
        text_layers=32,
        text_heads=32,
        text_kv_heads=32,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        image_size=336,
        patch_size=14,
        max_position_embeddings=4096,
    )
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
    for name in [k[len("model.layers.0.") :] for k in sd if k.startswith("model.layers.0.")]:
        swapped["model.layers.0." + name], swapped["model.layers.1." + name] = (
            sd["model.layers.1." + name],
            sd["model.layers.0." + name],
        )
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
    assert files == [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
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
    assert sorted(os.listdir(built.text_model)) == [
        "config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert sorted(os.listdir(built.vision_model)) == ["config.json", "preprocessor_config.json"]


def test_safetensors_and_single_file(tmp_path, sd):
    p = fb.build(tmp_path / "st", fmt="safetensors")
    assert sorted(os.listdir(p.original)) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
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

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


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
    committed = [
        FIXTURES / "tokenizer.model",
        FIXTURES / "prompts.json",
        *FIXTURES.glob("images/*.png"),
        *FIXTURES.glob("text/*"),
        FIXTURES / "conversations.json",
        FIXTURES / "llama3" / "tokenizer.json",
        FIXTURES / "phi3" / "tokenizer.json",
    ]
    assert sum(p.stat().st_size for p in committed) < 300_000


# ------------------------------------------------------------------------------------------
# backbones: llama3 and phi3 next to vicuna
# ------------------------------------------------------------------------------------------

NEW_BACKBONES = ("llama3", "phi3")
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)


@pytest.fixture(scope="module")
def backbone_fixtures(tiny_fixture) -> dict[str, fb.FixturePaths]:
    """The session's tiny Llama-3 and Phi-3 fixtures (``fb.build(root, backbone=name)``)."""
    return {name: tiny_fixture(name) for name in NEW_BACKBONES}


def _text_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's tensors of an original state dict: ``model.*`` / ``lm_head.*`` minus vision and projector."""
    return {
        k: v.float()
        for k, v in sd.items()
        if k.startswith(("model.", "lm_head.")) and not k.startswith(("model.vision_tower.", "model.mm_projector."))
    }


def _causal_lm_from_original(directory: Path):
    """The transformers causal LM named by the original config's family, built from that config's text fields."""
    import transformers

    cfg = json.loads((directory / "config.json").read_text())
    family = {"llava_llama": ("LlamaConfig", "LlamaForCausalLM"), "llava_phi3": ("Phi3Config", "Phi3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in family[cfg["model_type"]])
    config = config_cls(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    return model_cls(config).eval(), config


def render_llama3(conv: dict) -> str:
    """The original ``llava_llama_3`` prompt (conversation.py, SeparatorStyle.LLAMA_3)."""
    out = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
    for turn in conv["turns"]:
        out += f"<|start_header_id|>{turn['role']}<|end_header_id|>\n\n"
        if turn["text"]:
            out += turn["text"] + ("" if "<|eot_id|>" in turn["text"] else "<|eot_id|>")
    return out


def render_phi3(conv: dict) -> str:
    """The original ``llava_phi_3`` prompt (conversation.py, SeparatorStyle.Phi_3)."""
    out = f"<|system|>\n{LLAMA3_SYSTEM}<|end|>\n"
    for turn in conv["turns"]:
        out += f"<|{turn['role']}|>\n" + (turn["text"] + "<|end|>\n" if turn["text"] else "")
    return out


def test_backbone_specs():
    assert TinySpec.for_backbone("vicuna") == TinySpec()
    llama3, phi3 = TinySpec.for_backbone("llama3"), TinySpec.for_backbone("phi3")
    assert (llama3.backbone, llama3.vocab_size, llama3.text_kv_heads, llama3.tokenizer_len) == ("llama3", 1000, 2, 1000)
    assert (phi3.backbone, phi3.vocab_size, phi3.tokenizer_len) == ("phi3", 1024, 1008)
    assert tiny.original_config(llama3)["rope_theta"] == 500000.0
    assert [tiny.converted_rows(s) for s in (TinySpec(), llama3, phi3)] == [1024, 1024, 1024]
    phi3_hf = tiny.vipllava_config(phi3)
    assert type(phi3_hf.text_config).__name__ == "Phi3Config"
    assert (phi3_hf.image_token_index, phi3_hf.pad_token_id, phi3_hf.text_config.vocab_size) == (1008, 1009, 1024)
    with pytest.raises(ValueError, match="unknown backbone 'mistral'"):
        TinySpec(backbone="mistral")
    with pytest.raises(ValueError, match="tokenizer_size"):
        TinySpec(vocab_size=1000, tokenizer_size=1001)
    assert set(fb.TEXT_MODEL_FILES) == set(tiny.BACKBONES)


def test_original_configs_of_new_backbones():
    llama3 = tiny.original_config(TinySpec.for_backbone("llama3"))
    assert (llama3["model_type"], llama3["architectures"]) == ("llava_llama", ["LlavaLlamaForCausalLM"])
    assert (llama3["vocab_size"], llama3["num_key_value_heads"], llama3["rms_norm_eps"]) == (1000, 2, 1e-5)
    assert (llama3["bos_token_id"], llama3["eos_token_id"]) == (900, 901) and "pad_token_id" not in llama3
    phi3 = tiny.original_config(TinySpec.for_backbone("phi3"))
    assert (phi3["model_type"], phi3["architectures"]) == ("llava_phi3", ["LlavaPhi3ForCausalLM"])
    expected = {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "original_max_position_embeddings": 512,
        "sliding_window": 511,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 997,
        "pad_token_id": 997,
        "tie_word_embeddings": False,
    }  # the contract's list
    assert {k: phi3[k] for k in expected} == expected
    vicuna = tiny.original_config(TinySpec())
    mm = {k: v for k, v in vicuna.items() if k.startswith("mm_")}
    for cfg in (llama3, phi3):
        assert {k: v for k, v in cfg.items() if k.startswith("mm_")} == mm
        assert cfg["image_aspect_ratio"] == "pad" and cfg["torch_dtype"] == "bfloat16"


def test_new_backbone_key_layouts():
    vicuna = tiny.original_key_shapes(TinySpec())
    shared = {k: s for k, s in vicuna.items() if k.startswith(("model.vision_tower.", "model.mm_projector."))}
    for name in NEW_BACKBONES:
        spec = TinySpec.for_backbone(name)
        shapes = tiny.original_key_shapes(spec)
        assert {
            k: s for k, s in shapes.items() if k.startswith(("model.vision_tower.", "model.mm_projector."))
        } == shared
        assert not any("inv_freq" in k for k in shapes), name
        assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (spec.vocab_size, spec.text_hidden)
        assert list(shapes)[-1] == "lm_head.weight"
    phi3 = TinySpec.for_backbone("phi3")
    shapes = tiny.original_key_shapes(phi3)
    hd, kv = phi3.text_head_dim, phi3.text_kv_heads
    assert shapes["model.layers.1.self_attn.qkv_proj.weight"] == ((phi3.text_heads + 2 * kv) * hd, phi3.text_hidden)
    assert shapes["model.layers.1.mlp.gate_up_proj.weight"] == (2 * phi3.text_intermediate, phi3.text_hidden)
    assert not any(k.endswith((".q_proj.weight", ".gate_proj.weight")) for k in shapes if k.startswith("model.layers."))
    llama3 = TinySpec.for_backbone("llama3")
    k_proj = tiny.original_key_shapes(llama3)["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj == (llama3.text_kv_heads * llama3.text_head_dim, llama3.text_hidden)  # GQA


def test_phi3_lm_head_rows_beyond_the_tokenizer_are_zero():
    spec = TinySpec.for_backbone("phi3")
    sd = tiny.original_state_dict(spec, seed=0)
    head = sd["lm_head.weight"].float()
    assert head[spec.tokenizer_len :].abs().max() == 0
    assert (head[: spec.tokenizer_len].abs().sum(1) > 0).all()
    assert sd["model.embed_tokens.weight"].float()[spec.tokenizer_len :].std() > 0.1  # only lm_head is zeroed
    # the zeroing draws nothing: with T = V the same seed gives the same values everywhere else
    full = tiny.original_state_dict(TinySpec(backbone="phi3", vocab_size=1024), seed=0)
    assert all(torch.equal(full[k], sd[k]) for k in sd if k != "lm_head.weight")
    assert torch.equal(full["lm_head.weight"][: spec.tokenizer_len], sd["lm_head.weight"][: spec.tokenizer_len])


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_new_backbone_text_weights_load_strictly(backbone_fixtures, name):
    paths = backbone_fixtures[name]
    sd = _load_original(paths.original)
    model, config = _causal_lm_from_original(paths.original)
    assert type(model).__name__ == {"llama3": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[name]
    model.load_state_dict(_text_weights(sd), strict=True)
    spec = TinySpec.for_backbone(name)
    assert config.rope_parameters["rope_theta"] == tiny.get_backbone(name).rope_theta
    ids = torch.randint(0, spec.tokenizer_len, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits[..., : spec.tokenizer_len].std() > 0.1
    assert (logits[..., spec.tokenizer_len :] == 0).all()  # phi3: ids the tokenizer cannot produce are never argmax
    rebuilt, _ = tiny.build_reference_modules(spec, sd)
    assert type(rebuilt) is type(model)


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_new_backbone_build_is_deterministic_and_cli_agrees(backbone_fixtures, name, tmp_path):
    again = fb.build(tmp_path / "again", backbone=name, spec=TinySpec.for_backbone(name))
    assert _tree_bytes(backbone_fixtures[name].root) == _tree_bytes(again.root)
    subprocess.run(
        [sys.executable, "-m", "fixtures.build", str(tmp_path / "cli"), "--backbone", name],
        check=True,
        cwd=REPO,
        timeout=120,
        capture_output=True,
    )
    assert _tree_bytes(backbone_fixtures[name].root) == _tree_bytes(tmp_path / "cli")
    other_seed = fb.build(tmp_path / "seed1", backbone=name, seed=1)
    shards = [p for p in _tree_bytes(again.original) if p.endswith(".bin")]
    assert all(_tree_bytes(again.original)[p] != _tree_bytes(other_seed.original)[p] for p in shards)


def test_new_backbone_layouts_on_disk(built, backbone_fixtures):
    vicuna_vision = _tree_bytes(built.vision_model)
    text_files = {
        "llama3": ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"],
        "phi3": [
            "config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ],
    }
    for name, paths in backbone_fixtures.items():
        assert sorted(os.listdir(paths.original)) == sorted(os.listdir(built.original)), name
        assert sorted(os.listdir(paths.text_model)) == text_files[name]
        assert _tree_bytes(paths.vision_model) == vicuna_vision, name  # the vision model is unchanged
        spec = TinySpec.for_backbone(name)
        assert json.loads((paths.original / "config.json").read_text()) == tiny.original_config(spec)
        assert json.loads((paths.text_model / "config.json").read_text()) == tiny.base_text_config(spec)
        manifest = json.loads((paths.root / fb.MANIFEST).read_text())
        assert manifest["spec"]["backbone"] == name and set(manifest["files"]) == set(_tree_bytes(paths.root)) - {
            fb.MANIFEST
        }
        wm = json.loads((paths.original / "pytorch_model.bin.index.json").read_text())["weight_map"]
        assert set(wm) == set(tiny.original_key_shapes(spec))
    base = json.loads((backbone_fixtures["phi3"].text_model / "config.json").read_text())
    assert (base["model_type"], base["architectures"], base["vocab_size"]) == ("phi3", ["Phi3ForCausalLM"], 1024)
    base = json.loads((backbone_fixtures["llama3"].text_model / "config.json").read_text())
    assert (base["model_type"], base["vocab_size"], base["bos_token_id"], base["eos_token_id"]) == (
        "llama",
        1000,
        900,
        901,
    )


def test_build_refuses_a_spec_of_another_backbone(tmp_path):
    with pytest.raises(ValueError, match="spec is for backbone 'vicuna'"):
        fb.build(tmp_path / "x", spec=TinySpec(), backbone="phi3")
    with pytest.raises(ValueError, match="spec is for backbone 'llama3'"):
        fb.build(tmp_path / "y", spec=TinySpec.for_backbone("llama3"))
    with pytest.raises(ValueError, match="unknown backbone"):
        fb.build(tmp_path / "z", backbone="vicuna2")
    assert not any(tmp_path.iterdir())  # nothing written


# ---- llama3 tokenizer ----


def _llama3_special_ids() -> dict[str, int]:
    """The contract's named specials (900 + k mirrors Llama-3's 128000 + k)."""
    return {
        "<|begin_of_text|>": 900,
        "<|end_of_text|>": 901,
        "<|reserved_special_token_0|>": 902,
        "<|reserved_special_token_3|>": 905,
        "<|start_header_id|>": 906,
        "<|end_header_id|>": 907,
        "<|reserved_special_token_4|>": 908,
        "<|eot_id|>": 909,
        "<|reserved_special_token_5|>": 910,
        "<|reserved_special_token_94|>": 999,
    }


def test_llama3_tokenizer_facts(backbone_fixtures):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from fixtures import make_llama3_tokenizer as ml

    committed = FIXTURES / "llama3" / "tokenizer.json"
    for tok in (
        PreTrainedTokenizerFast(tokenizer_file=str(committed)),
        AutoTokenizer.from_pretrained(backbone_fixtures["llama3"].text_model),
    ):
        assert len(tok) == 1000
        assert tok.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 900
        assert {t: tok.convert_tokens_to_ids(t) for t in _llama3_special_ids()} == _llama3_special_ids()
        assert tok.convert_tokens_to_ids(ml.special_tokens()) == list(range(900, 1000))
        assert tok("hi").input_ids[0] == 900 and tok.decode(tok("hi").input_ids, skip_special_tokens=True) == "hi"
        header = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        user, blank = (tok(t, add_special_tokens=False).input_ids for t in ("user", "\n\n"))
        assert tok(header, add_special_tokens=False).input_ids == [900, 906, *user, 907, *blank]  # one id each
        assert tok(header).input_ids == [900, 900, 906, *user, 907, *blank]  # plus the automatic one
        assert all(i < 900 for i in user + blank)
    auto = AutoTokenizer.from_pretrained(backbone_fixtures["llama3"].text_model)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (900, 901, None)
    tc = json.loads((backbone_fixtures["llama3"].text_model / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "pad_token" not in tc
    assert tc["added_tokens_decoder"]["909"]["content"] == "<|eot_id|>" and len(tc["added_tokens_decoder"]) == 100


def test_llama3_tokenizer_pipeline_is_llama3s():
    from fixtures import make_llama3_tokenizer as ml

    d = json.loads((FIXTURES / "llama3" / "tokenizer.json").read_text())
    split, byte_level = d["pre_tokenizer"]["pretokenizers"]
    assert d["pre_tokenizer"]["type"] == "Sequence" and d["normalizer"] is None
    assert (split["type"], split["pattern"], split["behavior"]) == ("Split", {"Regex": ml.SPLIT_REGEX}, "Isolated")
    assert (byte_level["type"], byte_level["add_prefix_space"], byte_level["use_regex"]) == ("ByteLevel", False, False)
    assert d["decoder"]["type"] == "ByteLevel" and d["post_processor"]["type"] == "TemplateProcessing"
    assert [next(iter(x.values()))["id"] for x in d["post_processor"]["single"]] == ["<|begin_of_text|>", "A"]
    assert d["model"]["type"] == "BPE" and len(d["model"]["merges"]) == 900 - 256
    assert all(t["special"] and not t["normalized"] for t in d["added_tokens"])


def test_llama3_rendered_prompts_keep_specials_whole(backbone_fixtures):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone_fixtures["llama3"].text_model)
    for conv in fb.sample_conversations():
        prompt = render_llama3(conv)
        ids = tok(prompt).input_ids
        texts = [t["text"] for t in conv["turns"] if t["text"]]
        assert ids[:3] == [900, 900, 906]  # the auto <|begin_of_text|>, then the template's own
        assert ids.count(906) == ids.count(907) == 1 + len(conv["turns"])
        assert ids.count(909) == 1 + len(texts) and ids[-1] != 909
        assert tok.decode(ids[1:]) == prompt  # nothing lost or changed
        assert all(i < 900 for t in texts for i in tok(t, add_special_tokens=False).input_ids)


# ---- phi3 tokenizer ----


def test_phi3_tokenizer_facts(backbone_fixtures):
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from fixtures import make_phi3_tokenizer as mp

    contract = {
        "<|endoftext|>": 997,
        "<|assistant|>": 998,
        "<|placeholder1|>": 999,
        "<|placeholder4|>": 1002,
        "<|system|>": 1003,
        "<|end|>": 1004,
        "<|placeholder5|>": 1005,
        "<|placeholder6|>": 1006,
        "<|user|>": 1007,
    }
    fast = Tokenizer.from_file(str(FIXTURES / "phi3" / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    assert fast.get_vocab_size(with_added_tokens=True) == 1008
    assert {t: fast.token_to_id(t) for t in contract} == contract
    assert [fast.token_to_id(t) for t in mp.special_tokens()] == list(range(997, 1008))
    added = {t["content"]: t for t in json.loads((FIXTURES / "phi3" / "tokenizer.json").read_text())["added_tokens"]}
    assert all(
        added[t]["special"] and not (added[t]["normalized"] or added[t]["lstrip"] or added[t]["rstrip"])
        for t in contract
    )
    texts = [t["text"] for c in fb.sample_conversations() for t in c["turns"] if t["text"]]
    texts += [" two  spaces ", "\nWhat", "12345"]
    for text in texts:
        assert fast.encode(text).ids == [sp.bos_id()] + sp.encode(text), text
    auto = AutoTokenizer.from_pretrained(backbone_fixtures["phi3"].text_model)
    assert len(auto) == 1008
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id) == (1, 997, 997, 0)
    for text in texts + ["<|user|>\n<image>\nWhat is shown?<|end|>\n<|assistant|>\n"]:
        assert auto(text).input_ids == fast.encode(text).ids, text
    tc = json.loads((backbone_fixtures["phi3"].text_model / "tokenizer_config.json").read_text())
    assert {
        k: tc[k]
        for k in (
            "tokenizer_class",
            "legacy",
            "add_bos_token",
            "add_eos_token",
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
        )
    } == {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
    }
    assert {int(i) for i in tc["added_tokens_decoder"]} == {0, 1, 2, *range(997, 1008)}
    assert (backbone_fixtures["phi3"].text_model / "tokenizer.model").read_bytes() == sp.serialized_model_proto()


def test_phi3_tokenizer_pipeline_is_legacy_llama():
    d = json.loads((FIXTURES / "phi3" / "tokenizer.json").read_text())
    assert d["normalizer"] == {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ],
    }
    assert d["pre_tokenizer"] is None
    assert (d["model"]["type"], d["model"]["byte_fallback"], d["model"]["unk_token"]) == ("BPE", True, "<unk>")
    assert [x["type"] for x in d["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert [next(iter(x.values()))["id"] for x in d["post_processor"]["single"]] == ["<s>", "A"]


def test_phi3_rendered_prompts_keep_specials_whole(backbone_fixtures):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(backbone_fixtures["phi3"].text_model)
    for conv in fb.sample_conversations():
        ids = tok(render_phi3(conv)).input_ids
        roles = [t["role"] for t in conv["turns"]]
        done = [t for t in conv["turns"] if t["text"]]
        assert ids[:2] == [1, 1003]  # <s> (add_bos_token), <|system|>
        assert (ids.count(1007), ids.count(998), ids.count(1004)) == (
            roles.count("user"),
            roles.count("assistant"),
            1 + len(done),
        )
        assert ids[-3:] == [998] + tok("\n", add_special_tokens=False).input_ids


# ---- regeneration and the committed files ----


def test_backbone_tokenizers_are_regenerable():
    from fixtures import make_llama3_tokenizer as ml
    from fixtures import make_phi3_tokenizer as mp

    assert ml.train().encode("utf-8") == (FIXTURES / "llama3" / "tokenizer.json").read_bytes()
    assert (
        mp.build_tokenizer(mp.MODEL_PATH.read_bytes()).encode("utf-8")
        == (FIXTURES / "phi3" / "tokenizer.json").read_bytes()
    )
    # another process (another hash seed for the trainer's maps) writes the same bytes too
    out = subprocess.run(
        [sys.executable, "-m", "fixtures.make_llama3_tokenizer", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "up to date", out.stdout + out.stderr


@pytest.mark.parametrize(
    "module_name, special", [("make_llama3_tokenizer", "<|eot_id|>"), ("make_phi3_tokenizer", "<|user|>")]
)
def test_tokenizer_check_catches_a_stale_file(tmp_path, monkeypatch, capsys, module_name, special):
    import importlib

    module = importlib.import_module(f"fixtures.{module_name}")
    committed = module.OUT_PATH.read_text(encoding="utf-8")
    stale = tmp_path / "tokenizer.json"
    monkeypatch.setattr(module, "OUT_PATH", stale)
    stale.write_text(committed, encoding="utf-8")
    assert module.main(["--check"]) == 0
    stale.write_text(committed + "\n", encoding="utf-8")  # still a good tokenizer, but not what the script writes
    assert module.main(["--check"]) == 1 and "STALE" in capsys.readouterr().out
    stale.write_text(committed.replace(f'"{special}"', '"<|renamed|>"'), encoding="utf-8")
    with pytest.raises(ValueError, match="specials"):  # a special moved: the file is refused outright
        module.main(["--check"])


def test_demo_fixture_per_backbone_is_cached_and_tracks_its_data(tmp_path, monkeypatch):
    monkeypatch.setenv("VIPLLAVA_HARNESS_CACHE", str(tmp_path))
    p = fb.demo_fixture(backbone="llama3")
    assert p.root == tmp_path / "tiny-fixture-llama3-v1" == fb.demo_cache_dir("llama3")
    tok = p.text_model / "tokenizer.json"
    mtime = tok.stat().st_mtime_ns
    assert fb.demo_fixture(backbone="llama3") == p and tok.stat().st_mtime_ns == mtime  # reused
    assert fb._builder_fingerprint("llama3") not in {fb._builder_fingerprint("vicuna"), fb._builder_fingerprint("phi3")}
    # a changed tokenizer file is a changed fixture: the fingerprint moves and the cache is rebuilt
    changed = tmp_path / "changed.json"
    changed.write_bytes(tok.read_bytes() + b"\n")
    files = dict(fb.TEXT_MODEL_FILES)
    files["llama3"] = fb.TextModelFiles(
        (changed,), files["llama3"].tokenizer_config, files["llama3"].special_tokens_map
    )
    before = fb._builder_fingerprint("llama3")
    monkeypatch.setattr(fb, "TEXT_MODEL_FILES", files)
    assert fb._builder_fingerprint("llama3") != before
    monkeypatch.undo()
    monkeypatch.setenv("VIPLLAVA_HARNESS_CACHE", str(tmp_path))
    q = fb.demo_fixture(backbone="phi3")
    assert q.root == tmp_path / "tiny-fixture-phi3-v1" and (q.text_model / "tokenizer.model").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == [
        "changed.json",
        "tiny-fixture-llama3-v1",
        "tiny-fixture-phi3-v1",
    ]


# ---- conversations ----


def test_sample_conversations():
    convs = fb.sample_conversations()
    images = fb.sample_images()
    assert len(convs) == 6 and len({c["name"] for c in convs}) == 6
    for c in convs:
        assert list(c) == ["name", "image", "turns"]
        roles = [t["role"] for t in c["turns"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and all(
            set(t) == {"role", "text"} for t in c["turns"]
        )
        assert c["turns"][-1]["text"] is None and all(isinstance(t["text"], str) and t["text"] for t in c["turns"][:-1])
        text = "".join(t["text"] or "" for t in c["turns"])
        assert text.count("<image>") == (c["image"] is not None)
        assert c["image"] is None or (c["image"] in images and c["turns"][0]["text"].startswith("<image>\n"))
    single = [c for c in convs if len(c["turns"]) == 2 and c["image"]]
    assert len(single) == 4 and len({c["image"] for c in single}) == 4
    assert [len(c["turns"]) for c in convs if c["image"] and c not in single] == [4]
    assert [c["image"] for c in convs if c["image"] is None] == [None]
    assert {c["image"] for c in convs} >= {"square", "wide", "tall", "box"}
