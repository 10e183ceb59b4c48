"""Tests of verify/original/, the independent re-implementation of the ORIGINAL ViP-LLaVA.

Everything is built here, from scratch, on tiny shapes: a sentencepiece model trained on an
inline corpus with Llama-2 settings, a tiny Llama and a tiny 12-layer CLIP tower with random
(seeded) weights and non-zero biases, written in the ORIGINAL checkpoint layout.  Expected values
are derived by hand with plain torch / numpy / PIL, never through the class under test.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from verify.original import (
    FEATURE_LAYERS,
    IMAGE_SENTINEL,
    OriginalLoadError,
    OriginalVipLlava,
    ReferenceOutput,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CORPUS = """A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is shown in the image? ASSISTANT: A red circle on a blue square.
USER: What colour is the arrow pointing at? ASSISTANT: The arrow points at a green box.
What is the object inside the red rectangle? It is a small cat sitting on a mat.
Describe the region marked by the yellow ellipse in detail, please.
There are 3 dogs and 12 birds in the picture, near 2024 houses.
Hello world! How are you today? I am fine, thank you very much.
The quick brown fox jumps over the lazy dog while the cat watches.
Visual prompts such as arrows, boxes, circles and scribbles guide the model.
"""

HIDDEN = 32
VISION_HIDDEN = 16
VISION_LAYERS = 12
IMAGE_SIZE = 28
PATCH = 14
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2


# ------------------------------------------------------------------------------------------
# fixture builders
# ------------------------------------------------------------------------------------------


def train_sentencepiece(path: Path, vocab_size: int = 400) -> None:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def _added(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def write_text_model(folder: Path, sp_model: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added("<s>"),
        "eos_token": _added("</s>"),
        "unk_token": _added("<unk>"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    cfg.update(extra)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=40,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=8,
    )


def write_vision_model(folder: Path, size=None, crop=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vc = vision_config().to_dict()
    full = {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": 8,
        "text_config": {"model_type": "clip_text_model", "hidden_size": 16},
        "vision_config": {
            k: vc[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
                "hidden_act",
                "layer_norm_eps",
                "projection_dim",
            )
        },
    }
    full["vision_config"]["model_type"] = "clip_vision_model"
    (folder / "config.json").write_text(json.dumps(full))
    pre = {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE} if crop is None else crop,
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE} if size is None else size,
        "image_processor_type": "CLIPImageProcessor",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def llama_config(vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def original_config(vocab: int) -> dict:
    return {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "mm_vision_tower": "clip_4layers_336",
        "mm_hidden_size": 5 * VISION_HIDDEN,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
    }


def random_original_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout state dict, bf16, seeded; norm weights around 1, biases non-zero."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, key):
        if (
            key.endswith("norm.weight")
            or "layer_norm" in key
            and key.endswith("weight")
            or key.endswith("layrnorm.weight")
        ):
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        if key.endswith("bias"):
            return 0.1 * torch.randn(shape, generator=g)
        fan_in = shape[-1] if len(shape) > 1 else 1
        std = 1.0 / math.sqrt(max(fan_in, 1)) if len(shape) > 1 else 0.5
        if "embed" in key:
            std = 0.5
        return std * torch.randn(shape, generator=g)

    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(vocab))
        vis = CLIPVisionModel(vision_config())
    state: dict[str, torch.Tensor] = {}
    for k, t in llm.state_dict().items():
        state[k] = rnd(tuple(t.shape), k)
    for k, t in vis.state_dict().items():
        k = k[len("vision_model.") :] if k.startswith("vision_model.") else k
        state["model.vision_tower.vision_tower.vision_model." + k] = rnd(tuple(t.shape), k)
    mm = 5 * VISION_HIDDEN
    state["model.mm_projector.clip_layernorm.weight"] = 1.0 + 0.1 * torch.randn(mm, generator=g)
    state["model.mm_projector.clip_layernorm.bias"] = 0.1 * torch.randn(mm, generator=g)
    state["model.mm_projector.final_linear.0.weight"] = torch.randn(HIDDEN, mm, generator=g) / math.sqrt(mm)
    state["model.mm_projector.final_linear.0.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
    state["model.mm_projector.final_linear.2.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) / math.sqrt(HIDDEN)
    state["model.mm_projector.final_linear.2.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
    # legacy buffers older transformers saved; the loader must drop them
    for i in range(2):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(HIDDEN // 8, generator=g)
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(N_PATCHES + 1)[None]
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in state.items()}


def write_original(folder: Path, state: dict[str, torch.Tensor], vocab: int, layout: str = "bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(original_config(vocab)))
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout in ("bin-sharded", "safetensors-sharded"):
        keys = sorted(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        weight_map = {}
        for n, part in enumerate(halves, start=1):
            if layout == "bin-sharded":
                name = f"pytorch_model-{n:05d}-of-00002.bin"
                torch.save({k: state[k] for k in part}, folder / name)
            else:
                from safetensors.torch import save_file

                name = f"model-{n:05d}-of-00002.safetensors"
                save_file({k: state[k].contiguous() for k in part}, str(folder / name))
            weight_map.update({k: name for k in part})
        index = "pytorch_model.bin.index.json" if layout == "bin-sharded" else "model.safetensors.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:
        raise ValueError(layout)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vip_reference")
    sp_path = root / "sp.model"
    train_sentencepiece(sp_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    vocab = sp.get_piece_size()
    state = random_original_state(vocab)
    original = write_original(root / "original", state, vocab)
    text = write_text_model(root / "text_model", sp_path)
    vision = write_vision_model(root / "vision_model")
    model = OriginalVipLlava.from_dirs(original, text, vision)
    return {
        "root": root,
        "sp_path": sp_path,
        "sp": sp,
        "vocab": vocab,
        "state": state,
        "original": original,
        "text": text,
        "vision": vision,
        "model": model,
    }


def rand_image(w: int, h: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------
# 1. image features derived by hand
# ------------------------------------------------------------------------------------------


def hand_clip_hidden_states(sd: dict[str, torch.Tensor], pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The CLIP ViT written out with plain torch ops from the raw original tensors."""
    p = "model.vision_tower.vision_tower.vision_model."
    w = lambda k: sd[p + k].float()  # noqa: E731
    eps = 1e-5
    x = F.conv2d(pixel_values, w("embeddings.patch_embedding.weight"), stride=PATCH)  # [B, C, g, g]
    x = x.flatten(2).transpose(1, 2)
    cls = w("embeddings.class_embedding").expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + w("embeddings.position_embedding.weight")[None]
    x = F.layer_norm(x, (VISION_HIDDEN,), w("pre_layrnorm.weight"), w("pre_layrnorm.bias"), eps)
    states = [x]
    heads = 2
    hd = VISION_HIDDEN // heads
    for i in range(VISION_LAYERS):
        lp = f"encoder.layers.{i}."
        h = F.layer_norm(x, (VISION_HIDDEN,), w(lp + "layer_norm1.weight"), w(lp + "layer_norm1.bias"), eps)
        q = F.linear(h, w(lp + "self_attn.q_proj.weight"), w(lp + "self_attn.q_proj.bias"))
        k = F.linear(h, w(lp + "self_attn.k_proj.weight"), w(lp + "self_attn.k_proj.bias"))
        v = F.linear(h, w(lp + "self_attn.v_proj.weight"), w(lp + "self_attn.v_proj.bias"))
        B, S, _ = q.shape
        q, k, v = (t.view(B, S, heads, hd).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, S, VISION_HIDDEN)
        x = x + F.linear(o, w(lp + "self_attn.out_proj.weight"), w(lp + "self_attn.out_proj.bias"))
        h = F.layer_norm(x, (VISION_HIDDEN,), w(lp + "layer_norm2.weight"), w(lp + "layer_norm2.bias"), eps)
        h = F.linear(h, w(lp + "mlp.fc1.weight"), w(lp + "mlp.fc1.bias"))
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + F.linear(h, w(lp + "mlp.fc2.weight"), w(lp + "mlp.fc2.bias"))
        states.append(x)
    return states


def test_image_features_match_hand_derivation(world):
    model, sd = world["model"], world["state"]
    g = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    states = hand_clip_hidden_states(sd, pixel_values)
    assert len(states) == VISION_LAYERS + 1
    feats = torch.cat([states[i][:, 1:] for i in (-2, -5, -8, -11, 6)], dim=-1)
    assert feats.shape == (2, N_PATCHES, 5 * VISION_HIDDEN)
    pp = "model.mm_projector."
    x = F.layer_norm(
        feats,
        (feats.shape[-1],),
        sd[pp + "clip_layernorm.weight"].float(),
        sd[pp + "clip_layernorm.bias"].float(),
        1e-5,
    )
    x = F.linear(x, sd[pp + "final_linear.0.weight"].float(), sd[pp + "final_linear.0.bias"].float())
    x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    expected = F.linear(x, sd[pp + "final_linear.2.weight"].float(), sd[pp + "final_linear.2.bias"].float())

    got = model.image_features(pixel_values)
    assert got.dtype == torch.float32
    assert got.shape == (2, N_PATCHES, HIDDEN)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.feature_layers == FEATURE_LAYERS == (-2, -5, -8, -11, 6)
    # the per-image path equals the batched one
    torch.testing.assert_close(model.image_features(pixel_values[1]), expected[1:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 2. tokenization
# ------------------------------------------------------------------------------------------


def test_tokenize_image_then_newline_keeps_dummy_prefix_piece(world):
    model, sp = world["model"], world["sp"]
    ids = model.tokenize("<image>\nWhat")
    underline, newline = sp.piece_to_id("\u2581"), sp.piece_to_id("<0x0A>")
    assert ids[:4] == [1, IMAGE_SENTINEL, underline, newline]
    assert ids == [1, IMAGE_SENTINEL] + sp.encode("\nWhat")


def test_tokenize_text_only_is_bos_plus_sentencepiece(world):
    model, sp = world["model"], world["sp"]
    for text in ["What is shown in the image?", "  two spaces", "", " ", "é漢字 USER: 2024"]:
        assert model.tokenize(text) == [1] + sp.encode(text)


def test_tokenize_two_images_and_edges(world):
    model, sp = world["model"], world["sp"]
    prompt = "USER: <image>\nLeft <image>\nRight ASSISTANT:"
    a, b, c = prompt.split("<image>")
    assert model.tokenize(prompt) == [1] + sp.encode(a) + [IMAGE_SENTINEL] + sp.encode(b) + [
        IMAGE_SENTINEL
    ] + sp.encode(c)
    # adjacent images, and a prompt ending with an image
    assert model.tokenize("<image><image>") == [1, IMAGE_SENTINEL, IMAGE_SENTINEL]
    assert model.tokenize("hi <image>") == [1] + sp.encode("hi ") + [IMAGE_SENTINEL]


def test_tokenize_special_tokens_legacy(world):
    model, sp = world["model"], world["sp"]
    assert model.tokenizer.legacy is True
    text = "ASSISTANT: ok</s>USER: next"
    expected = [1] + sp.encode("ASSISTANT: ok") + [2] + sp.encode("USER: next")
    assert model.tokenize(text) == expected
    # Llama's special tokens are AddedToken(lstrip=False, rstrip=False): no whitespace stripping
    assert model.tokenize("a </s> b") == [1] + sp.encode("a ") + [2] + sp.encode(" b")
    assert model.tokenize("x<s><unk>") == [1] + sp.encode("x") + [1, 0]


def _without_dummy_prefix(sp_path: Path) -> spm.SentencePieceProcessor:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto.SerializeToString())
    return sp


def test_tokenize_special_tokens_non_legacy_4_37(world, tmp_path):
    """transformers 4.37.2 (the original code's pin): text after a special token goes through sentencepiece with
    the dummy prefix OFF (no leading "▁" is made up); a leading space becomes "▁" as written."""
    sp = world["sp"]
    text_dir = write_text_model(tmp_path / "text_nl", world["sp_path"], legacy=False)
    from verify.original import LlamaSlowTokenizer

    tok = LlamaSlowTokenizer(text_dir)
    assert (tok.legacy, tok.era) == (False, "4.37.2")
    plain = _without_dummy_prefix(world["sp_path"])
    # the first chunk: "▁" + text with no dummy prefix is the ordinary encoding
    assert tok.encode("ASSISTANT: ok") == [1] + sp.encode("ASSISTANT: ok")
    assert tok.encode("ASSISTANT: ok</s>USER: next") == [1] + sp.encode("ASSISTANT: ok") + [2] + plain.encode(
        "USER: next"
    )
    assert tok.encode("a </s> b") == [1] + sp.encode("a ") + [2] + plain.encode(" b")
    # a lone "▁" before a leading special token is dropped
    assert tok.encode("</s>x") == [1, 2] + plain.encode("x")
    # the chunk after <image> still begins with the dummy-prefix piece
    assert tok.encode_with_images("<image>\nWhat") == [1, IMAGE_SENTINEL] + sp.encode("\nWhat")
    # legacy: null is the legacy tokenizer in 4.37 (it was non-legacy in 4.31)
    assert LlamaSlowTokenizer(write_text_model(tmp_path / "text_null", world["sp_path"], legacy=None)).legacy is True


def test_tokenize_special_tokens_non_legacy_4_31(world, tmp_path):
    sp = world["sp"]
    text_dir = write_text_model(tmp_path / "text_nl", world["sp_path"], legacy=False)
    from verify.original import LlamaSlowTokenizer

    tok = LlamaSlowTokenizer(text_dir, era="4.31.0")
    assert tok.legacy is False

    def strip_first(pieces):
        if pieces and pieces[0].startswith("\u2581"):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return [sp.piece_to_id(p) for p in pieces]

    got = tok.encode_with_images("ASSISTANT: ok</s>USER: next")
    assert got == [1] + sp.encode("ASSISTANT: ok") + [2] + strip_first(sp.encode("USER: next", out_type=str))
    # text after a special token that starts with a space keeps its pieces
    assert tok.encode("a </s> b") == [1] + sp.encode("a ") + [2] + sp.encode(" b")
    # the chunk after <image> still begins with the dummy-prefix piece
    assert tok.encode_with_images("<image>\nWhat") == [1, IMAGE_SENTINEL] + sp.encode("\nWhat")
    assert (
        LlamaSlowTokenizer(write_text_model(tmp_path / "text_null", world["sp_path"], legacy=None), era="4.31.0").legacy
        is False
    )


def test_plain_string_special_tokens_strip_whitespace_only_in_4_31(world, tmp_path):
    sp = world["sp"]
    text_dir = write_text_model(tmp_path / "text_map", world["sp_path"])
    # special_tokens_map.json with plain strings: in transformers 4.31 such tokens strip both sides; 4.37 wraps
    # them in AddedTokens that strip nothing
    (text_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": _added("<unk>")})
    )
    from verify.original import LlamaSlowTokenizer

    tok = LlamaSlowTokenizer(text_dir, era="4.31.0")
    assert tok.encode("a </s> b") == [1] + sp.encode("a") + [2] + sp.encode("b")
    assert tok.encode("a <unk> b") == [1] + sp.encode("a ") + [0] + sp.encode(" b")
    tok = LlamaSlowTokenizer(text_dir)
    assert tok.encode("a </s> b") == [1] + sp.encode("a ") + [2] + sp.encode(" b")


def test_added_token_flags_strip_whitespace_in_4_37(world, tmp_path):
    sp = world["sp"]
    eos = dict(_added("</s>"), lstrip=True, rstrip=True)
    text_dir = write_text_model(tmp_path / "text_flags", world["sp_path"], eos_token=eos)
    from verify.original import LlamaSlowTokenizer

    assert LlamaSlowTokenizer(text_dir).encode("a </s> b") == [1] + sp.encode("a") + [2] + sp.encode("b")


def test_unknown_tokenizer_era_is_refused(world, tmp_path):
    from verify.original import LlamaSlowTokenizer

    with pytest.raises(ValueError, match="4.37.2"):
        LlamaSlowTokenizer(write_text_model(tmp_path / "t", world["sp_path"]), era="4.40")


# ------------------------------------------------------------------------------------------
# 3. preprocessing
# ------------------------------------------------------------------------------------------


def test_preprocess_pads_non_square_with_mean_colour(world):
    model = world["model"]
    img = PIL.Image.new("RGB", (60, 30), (255, 0, 0))
    out = model.preprocess(img)
    assert out.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    pad = torch.tensor([(int(255 * m) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    red = torch.tensor(
        [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1], (0 - CLIP_MEAN[2]) / CLIP_STD[2]]
    )
    for y, x in [(0, 0), (0, IMAGE_SIZE - 1), (IMAGE_SIZE - 1, 0), (IMAGE_SIZE - 1, IMAGE_SIZE - 1)]:
        torch.testing.assert_close(out[:, y, x], pad, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, IMAGE_SIZE // 2, IMAGE_SIZE // 2], red, atol=1e-6, rtol=0)
    # a plain CLIP processor would centre-crop instead: no mean-colour rows at all
    assert model.image_settings.pad_color == (122, 116, 104)


def test_preprocess_square_image_is_not_padded(world):
    model = world["model"]
    img = rand_image(56, 56, seed=1)
    out = model.preprocess(img)
    resized = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), resample=PIL.Image.Resampling.BICUBIC))
    expected = ((resized * (1 / 255)).astype(np.float32) - np.array(CLIP_MEAN, np.float32)) / np.array(
        CLIP_STD, np.float32
    )
    torch.testing.assert_close(out, torch.from_numpy(expected.transpose(2, 0, 1).copy()), atol=0, rtol=0)


def test_preprocess_offsets_resize_and_crop(world, tmp_path):
    """expand2square floors the offset; resize keeps int(N * long / short); crop floors too."""
    vision_dir = write_vision_model(tmp_path / "vision_big", size=31, crop=31)
    from verify.original import ClipPreprocessSettings

    model = world["model"]
    saved = model.image_settings
    try:
        model.image_settings = ClipPreprocessSettings.from_file(vision_dir / "preprocessor_config.json")
        img = rand_image(31, 20, seed=2)  # pad 11 rows: 5 above, 6 below
        out = model.preprocess(img)
        assert out.shape == (3, 31, 31)
        mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
        arr = ((np.asarray(img) * (1 / 255)).astype(np.float32) - mean) / std
        torch.testing.assert_close(out[:, 5:25, :], torch.from_numpy(arr.transpose(2, 0, 1).copy()), atol=0, rtol=0)
        pad = torch.from_numpy(((np.array([122, 116, 104]) * (1 / 255)).astype(np.float32) - mean) / std)
        for row in [0, 4, 25, 30]:
            torch.testing.assert_close(out[:, row, 0], pad, atol=0, rtol=0)

        # without padding (image_aspect_ratio != "pad"): shortest edge -> 31, long edge
        # int(31 * 45 / 20) = 69, then a floored centre crop of 31 columns
        model.image_aspect_ratio = "square"
        img = rand_image(45, 20, seed=3)
        out = model.preprocess(img)
        resized = np.asarray(img.resize((69, 31), resample=PIL.Image.Resampling.BICUBIC))
        left = (69 - 31) // 2
        arr = ((resized[:, left : left + 31] * (1 / 255)).astype(np.float32) - mean) / std
        torch.testing.assert_close(out, torch.from_numpy(arr.transpose(2, 0, 1).copy()), atol=0, rtol=0)
    finally:
        model.image_settings = saved
        model.image_aspect_ratio = "pad"


# ------------------------------------------------------------------------------------------
# 4. splicing
# ------------------------------------------------------------------------------------------


def plain_llm(world) -> LlamaForCausalLM:
    cfg = llama_config(world["vocab"])
    cfg._attn_implementation = "eager"
    llm = LlamaForCausalLM(cfg)
    sd = {
        k: v.float()
        for k, v in world["state"].items()
        if not k.startswith("model.vision_tower") and not k.startswith("model.mm_projector") and "rotary_emb" not in k
    }
    llm.load_state_dict(sd, strict=True)
    return llm.eval()


def test_splice_lengths_positions_and_prefix_logits(world):
    model = world["model"]
    ids = model.tokenize("A chat. USER: <image>\nWhat is it? <image>\nAnd this? ASSISTANT:")
    images = [rand_image(40, 30, seed=10), rand_image(28, 28, seed=11)]
    out = model.forward(ids, images, capture=True)
    assert isinstance(out, ReferenceOutput)
    n_img = ids.count(IMAGE_SENTINEL)
    assert n_img == 2
    T = len(ids) + n_img * (N_PATCHES - 1)
    assert out.logits.shape == (T, world["vocab"]) and out.logits.dtype == torch.float32

    expected_positions = []
    for i, t in enumerate(ids):
        expected_positions += [i] * (N_PATCHES if t == IMAGE_SENTINEL else 1)
    assert out.input_positions == expected_positions

    first = ids.index(IMAGE_SENTINEL)
    with torch.no_grad():
        ref = plain_llm(world)(input_ids=torch.tensor([ids[:first]])).logits[0]
    torch.testing.assert_close(out.logits[:first], ref, atol=1e-5, rtol=1e-5)

    # the spliced rows are the projected image features, text rows the embeddings
    emb = out.trace["decoder.embeddings"]
    feats = model.image_features(torch.stack([model.preprocess(im) for im in images]))
    torch.testing.assert_close(emb[first : first + N_PATCHES], feats[0])
    second = expected_positions.index(ids.index(IMAGE_SENTINEL, first + 1))
    torch.testing.assert_close(emb[second : second + N_PATCHES], feats[1])
    table = world["state"]["model.embed_tokens.weight"].float()
    torch.testing.assert_close(emb[first + N_PATCHES], table[ids[first + 1]])

    # trace keys and shapes
    tr = out.trace
    assert tr["vision.embeddings"].shape == (2, N_PATCHES + 1, VISION_HIDDEN)
    assert all(f"vision.layer.{i}" in tr for i in range(VISION_LAYERS))
    assert tr["projector"].shape == (2, N_PATCHES, HIDDEN)
    assert tr["decoder.layer.0"].shape == (T, HIDDEN) and "decoder.layer.1" in tr
    torch.testing.assert_close(tr["logits"], out.logits)
    w = world["state"]["model.norm.weight"].float()
    last = tr["decoder.layer.1"]
    normed = last * torch.rsqrt(last.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(tr["decoder.norm"], normed, atol=1e-5, rtol=1e-5)
    assert all(v.dtype == torch.float32 for v in tr.values())


def test_text_only_forward_matches_plain_llama(world):
    model = world["model"]
    ids = model.tokenize("Hello world! How are you today?")
    out = model.forward(ids)
    with torch.no_grad():
        ref = plain_llm(world)(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert out.input_positions == list(range(len(ids)))
    assert out.trace == {}


def test_image_count_mismatch_is_an_error(world):
    model = world["model"]
    ids = model.tokenize("<image>\nWhat")
    with pytest.raises(ValueError, match="sentinel"):
        model.forward(ids, [])
    with pytest.raises(ValueError, match="sentinel"):
        model.forward(model.tokenize("What"), [rand_image(28, 28, 0)])


def test_fp32_runs_are_bitwise_repeatable_and_bf16_runs(world):
    model = world["model"]
    ids = model.tokenize("USER: <image>\nWhat is it? ASSISTANT:")
    img = [rand_image(33, 21, seed=4)]
    a, b = model.forward(ids, img).logits, model.forward(ids, img).logits
    assert torch.equal(a, b)
    bf = OriginalVipLlava.from_dirs(world["original"], world["text"], world["vision"], dtype=torch.bfloat16)
    c = bf.forward(ids, img).logits
    assert c.dtype == torch.float32 and c.shape == a.shape
    assert bf.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(c).all()


# ------------------------------------------------------------------------------------------
# 5. loader
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors", "safetensors-sharded"])
def test_other_layouts_load_identically(world, tmp_path, layout):
    folder = write_original(tmp_path / layout, world["state"], world["vocab"], layout=layout)
    other = OriginalVipLlava.from_dirs(folder, world["text"], world["vision"])
    ids = world["model"].tokenize("<image>\nWhat")
    img = [rand_image(30, 40, seed=6)]
    assert torch.equal(other.forward(ids, img).logits, world["model"].forward(ids, img).logits)


def test_loader_refuses_unknown_key(world, tmp_path):
    state = dict(world["state"])
    state["model.mm_projector.extra.weight"] = torch.zeros(3)
    folder = write_original(tmp_path / "unknown", state, world["vocab"])
    with pytest.raises(OriginalLoadError, match=r"model\.mm_projector\.extra\.weight"):
        OriginalVipLlava.from_dirs(folder, world["text"], world["vision"])
    state = dict(world["state"])
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(HIDDEN)
    folder = write_original(tmp_path / "unknown2", state, world["vocab"])
    with pytest.raises(OriginalLoadError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        OriginalVipLlava.from_dirs(folder, world["text"], world["vision"])


@pytest.mark.parametrize(
    "key",
    [
        "model.mm_projector.final_linear.2.bias",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.bias",
        "lm_head.weight",
    ],
)
def test_loader_refuses_missing_key(world, tmp_path, key):
    state = {k: v for k, v in world["state"].items() if k != key}
    folder = write_original(tmp_path / "missing", state, world["vocab"])
    short = key.split("vision_model.")[-1] if "vision_tower" in key else key
    with pytest.raises(OriginalLoadError, match=short.replace(".", r"\.")):
        OriginalVipLlava.from_dirs(folder, world["text"], world["vision"])


def test_loader_refuses_wrong_shape(world, tmp_path):
    state = dict(world["state"])
    state["model.mm_projector.final_linear.0.bias"] = torch.zeros(HIDDEN + 1)
    folder = write_original(tmp_path / "shape", state, world["vocab"])
    with pytest.raises(OriginalLoadError, match="final_linear.0.bias"):
        OriginalVipLlava.from_dirs(folder, world["text"], world["vision"])


def test_config_comes_from_the_original(world):
    model = world["model"]
    assert model.llm.config.rms_norm_eps == 1e-5
    assert model.llm.config.vocab_size == world["vocab"]
    assert model.config["model_type"] == "llava_llama"
    assert model.llm.config._attn_implementation == "sdpa"  # as 4.37.2 chose for a Llama (measured)
    assert model.vision.config._attn_implementation == "eager"
    assert model.vision.config.num_hidden_layers == VISION_LAYERS


# ------------------------------------------------------------------------------------------
# 6. greedy generation
# ------------------------------------------------------------------------------------------


def test_greedy_generation_is_argmax_step_by_step(world):
    model = world["model"]
    ids = model.tokenize("USER: <image>\nWhat is shown? ASSISTANT:")
    img = [rand_image(40, 28, seed=8)]
    got = model.generate_greedy(ids, img, max_new_tokens=5)
    assert got == model.generate_greedy(ids, img, max_new_tokens=5)
    assert 1 <= len(got) <= 5
    seq = list(ids)
    for tok in got:
        logits = model.forward(seq, img).logits[-1]
        assert tok == int(torch.argmax(logits))
        seq.append(tok)
    if len(got) < 5:
        assert got[-1] == 2


def test_spliced_sequence_is_truncated_to_tokenizer_model_max_length(world):
    model = world["model"]
    ids = model.tokenize("USER: <image>\nWhat is it? ASSISTANT:")
    img = [rand_image(28, 28, seed=9)]
    full = model.forward(ids, img)
    saved = model.max_length
    try:
        model.max_length = len(full.input_positions) - 3
        cut = model.forward(ids, img)
    finally:
        model.max_length = saved
    assert cut.logits.shape[0] == len(full.input_positions) - 3
    assert cut.input_positions == full.input_positions[:-3]
    torch.testing.assert_close(cut.logits, full.logits[:-3], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 7. backbones: conversation formats (verbatim from the original conversation.py)
# ------------------------------------------------------------------------------------------

from verify.original import (  # noqa: E402
    BACKBONES,
    CONV_MODES,
    detect_backbone,
    expected_layout,
    render_prompt,
)

ONE_TURN = [{"role": "user", "text": "<image>\nWhat is shown?"}, {"role": "assistant", "text": None}]
TWO_TURNS = [
    {"role": "user", "text": "<image>\nWhat is shown?"},
    {"role": "assistant", "text": "A cat."},
    {"role": "user", "text": "What colour?"},
    {"role": "assistant", "text": None},
]

# Produced by RUNNING the original llava/conversation.py; see the provenance in tests/original_prompts.json.
# (a) = ONE_TURN, (b) = TWO_TURNS.
ORIGINAL_PROMPTS = {
    (mode, case): text
    for mode, cases in json.loads((Path(__file__).with_name("original_prompts.json")).read_text())["prompts"].items()
    for case, text in cases.items()
}


@pytest.mark.parametrize("mode,case", sorted(ORIGINAL_PROMPTS), ids=[f"{m}-{c}" for m, c in sorted(ORIGINAL_PROMPTS)])
def test_conversation_renderer_reproduces_the_original_get_prompt(mode, case):
    turns = ONE_TURN if case == "a" else TWO_TURNS
    assert render_prompt(turns, mode) == ORIGINAL_PROMPTS[(mode, case)]
    # (role, text) pairs are accepted as well
    assert render_prompt([(t["role"], t["text"]) for t in turns], mode) == ORIGINAL_PROMPTS[(mode, case)]


def test_conversation_renderer_edge_rules():
    # the original skips the end-of-turn marker when the message already holds <|eot_id|> (Phi-3 copies the rule)
    t = [{"role": "user", "text": "hi<|eot_id|>"}, {"role": "assistant", "text": None}]
    assert render_prompt(t, "llava_llama_3").endswith(
        "user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render_prompt(t, "llava_phi_3").endswith("<|user|>\nhi<|eot_id|><|assistant|>\n")
    # an empty string is an open turn, as `if message:` treats it
    assert render_prompt([{"role": "user", "text": "q"}, {"role": "assistant", "text": ""}], "llava_v1").endswith(
        "USER: q ASSISTANT:"
    )
    # LLAMA_3 / Phi_3 assert a non-empty first user message; TWO does not
    for mode in ("llava_llama_3", "llava_phi_3"):
        with pytest.raises(ValueError, match="first message"):
            render_prompt([{"role": "assistant", "text": "x"}], mode)
    # TWO picks the separator by position (i % 2), not by role
    assert render_prompt([{"role": "assistant", "text": "x"}], "llava_v1").endswith("questions. ASSISTANT: x ")
    with pytest.raises(ValueError, match="role"):
        render_prompt([{"role": "system", "text": "x"}], "llava_v1")
    with pytest.raises(ValueError, match="mode"):
        render_prompt(ONE_TURN, "llava_v0")


def test_backbone_records():
    assert {n: b.conv_mode for n, b in BACKBONES.items()} == {
        "vicuna": "llava_v1",
        "llama3": "llava_llama_3",
        "phi3": "llava_phi_3",
    }
    assert set(CONV_MODES) == {"llava_v1", "llava_llama_3", "llava_phi_3"}
    assert {n: b.stop_tokens for n, b in BACKBONES.items()} == {
        "vicuna": (),
        "llama3": ("<|eot_id|>",),
        "phi3": ("<|end|>",),
    }


def test_expected_layout_is_the_contract():
    assert expected_layout(997, 997) == {
        "image": 997,
        "pad": 998,
        "rows": 1024,
        "original_rows": 997,
        "base_tokens": 997,
    }
    assert expected_layout(1000, 1000)["rows"] == 1024
    assert expected_layout(1008, 1024) == {
        "image": 1008,
        "pad": 1009,
        "rows": 1024,
        "original_rows": 1024,
        "base_tokens": 1008,
    }
    assert expected_layout(32000, 32000)["rows"] == 32064
    assert expected_layout(128256, 128256)["rows"] == 128320
    assert expected_layout(32011, 32064)["rows"] == 32064
    with pytest.raises(OriginalLoadError, match="1025 tokens"):
        expected_layout(1025, 1024)


def test_detect_backbone_from_model_type_and_tokenizer(world, tmp_path):
    assert detect_backbone(world["original"], world["text"]) == "vicuna"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llava_mistral"}))
    with pytest.raises(OriginalLoadError, match=r"bad/config\.json: model_type 'llava_mistral'"):
        detect_backbone(bad, world["text"])
    with pytest.raises(OriginalLoadError, match="config.json not found"):
        detect_backbone(tmp_path / "nowhere", world["text"])
    # a llava_llama checkpoint whose base tokenizer has <|eot_id|> is Llama-3
    text = tmp_path / "text_eot"
    text.mkdir()
    (text / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"9": _added("<|eot_id|>")}}))
    assert detect_backbone(world["original"], text) == "llama3"


# ------------------------------------------------------------------------------------------
# 8. the tiny Llama-3 and Phi-3 fixtures (fixtures.build, shared contract)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_fixtures(tiny_fixture):
    """The session's tiny Llama-3 and Phi-3 fixtures (read only) and the reference model loaded from each."""
    out = {}
    for name in ("llama3", "phi3"):
        paths = tiny_fixture(name)
        out[name] = {
            "paths": paths,
            "model": OriginalVipLlava.from_dirs(paths.original, paths.text_model, paths.vision_model),
        }
    return out


def test_fixture_backbones_are_detected(backbone_fixtures):
    for name, f in backbone_fixtures.items():
        p = f["paths"]
        assert detect_backbone(p.original, p.text_model) == name
        assert f["model"].backbone.name == name


def test_llama3_prompt_starts_with_two_bos_ids(backbone_fixtures):
    """The prompt TEXT opens with <|begin_of_text|> and the fast tokenizer's post-processor adds another: the
    original input began with two BOS ids, then <|start_header_id|>."""
    model = backbone_fixtures["llama3"]["model"]
    prompt = render_prompt(ONE_TURN, "llava_llama_3")
    ids = model.tokenize(prompt)
    assert ids[:3] == [900, 900, 906]
    tk = model.tokenizer.tk
    assert tk.token_to_id("<|begin_of_text|>") == 900 and tk.token_to_id("<|eot_id|>") == 909
    # one image sentinel right after the user header's "\n\n"; the chunk after it lost only its auto-BOS
    k = ids.index(IMAGE_SENTINEL)
    head, tail = prompt.split("<image>")
    assert ids[:k] == tk.encode(head).ids  # BOS (auto) + the literal BOS + ...
    assert ids[k + 1 :] == tk.encode(tail).ids[1:]
    assert tk.encode(tail).ids[0] == 900
    assert tk.decode(ids[k + 1 : k + 2], skip_special_tokens=False).startswith("\n")
    assert ids.count(IMAGE_SENTINEL) == 1


def test_phi3_tokenization_bos_and_underline_after_the_image(backbone_fixtures):
    """Phi-3's LlamaTokenizerFast: BOS <s> (1) from add_bos_token; the chunk after <image> starts a fresh string, so
    its text begins with the sentencepiece "\u2581" piece before "\\n"."""
    model = backbone_fixtures["phi3"]["model"]
    prompt = render_prompt(ONE_TURN, "llava_phi_3")
    ids = model.tokenize(prompt)
    tk = model.tokenizer.tk
    assert ids[0] == 1 and ids[1] == tk.token_to_id("<|system|>") == 1003 and ids.count(1) == 1
    k = ids.index(IMAGE_SENTINEL)
    # Microsoft's normalizer (Prepend "\u2581") runs on every text segment between special tokens
    assert [tk.id_to_token(i) for i in ids[k - 3 : k]] == ["<|user|>", "\u2581", "<0x0A>"]
    assert tk.id_to_token(ids[k + 1]) == "\u2581" and tk.id_to_token(ids[k + 2]) == "<0x0A>"
    assert ids[k + 1 :] == tk.encode(prompt.split("<image>")[1], add_special_tokens=False).ids
    # the fast tokenizer is the one the original inference used, and the file's own post-processor is replaced
    assert model.tokenizer.add_bos_token is True and model.tokenizer.bos_id == 1


def test_terminators_and_layout_per_backbone(backbone_fixtures):
    llama3, phi3 = backbone_fixtures["llama3"]["model"], backbone_fixtures["phi3"]["model"]
    assert llama3.terminators == {"<|end_of_text|>": 901, "<|eot_id|>": 909}
    assert phi3.terminators == {"<|endoftext|>": 997, "<|end|>": 1004}
    assert (llama3.base_tokens, llama3.llm.config.vocab_size) == (1000, 1000)
    assert (phi3.base_tokens, phi3.llm.config.vocab_size) == (1008, 1024)
    assert phi3.emit_limit == 1008 and llama3.emit_limit == 1000


def test_llama3_text_config_comes_from_the_original(backbone_fixtures):
    cfg = backbone_fixtures["llama3"]["model"].llm.config
    assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads == 4
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert type(backbone_fixtures["llama3"]["model"].llm) is LlamaForCausalLM


def test_phi3_reference_logits_equal_a_direct_phi3_run(backbone_fixtures):
    """Text-only prompt: the reference equals Phi3ForCausalLM built straight from the original config.json and the
    original text tensors (fused qkv_proj / gate_up_proj as stored)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    f = backbone_fixtures["phi3"]
    model, orig = f["model"], f["paths"].original
    cfg = json.loads((orig / "config.json").read_text())
    assert cfg["model_type"] == "llava_phi3"
    pc = Phi3Config(
        **{
            k: cfg[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "original_max_position_embeddings",
                "sliding_window",
                "rope_theta",
                "rms_norm_eps",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
            )
        }
    )
    pc._attn_implementation = "eager"
    direct = Phi3ForCausalLM(pc).eval()
    from verify.original import load_original_state_dict

    sd = {
        k: v.float()
        for k, v in load_original_state_dict(orig).items()
        if not k.startswith(("model.vision_tower.", "model.mm_projector."))
    }
    assert any(k.endswith("self_attn.qkv_proj.weight") for k in sd) and any(
        k.endswith("mlp.gate_up_proj.weight") for k in sd
    )
    direct.load_state_dict(sd, strict=True)
    turns = [{"role": "user", "text": "What is the capital of France?"}, {"role": "assistant", "text": None}]
    ids = model.tokenize(render_prompt(turns, "llava_phi_3"))
    assert IMAGE_SENTINEL not in ids
    with torch.no_grad():
        want = direct(input_ids=torch.tensor([ids])).logits[0]
    got = model.forward(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.llm.config.sliding_window == cfg["sliding_window"]
    assert type(model.llm) is Phi3ForCausalLM


def test_phi3_rope_scaling_is_refused(backbone_fixtures, tmp_path):
    import shutil

    src = backbone_fixtures["phi3"]["paths"]
    dst = tmp_path / "orig"
    shutil.copytree(src.original, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "su", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OriginalLoadError, match="rope_scaling"):
        OriginalVipLlava.from_dirs(dst, src.text_model, src.vision_model)


def _steer_last_logits(model, edit):
    """A forward hook on the text model: ``edit(call_index, last_row)`` rewrites the last position's logits of every
    text-model call (prompt forward and cached steps alike)."""
    calls = []

    def hook(_module, _args, out):
        edit(len(calls), out.logits[0, -1])
        calls.append(1)
        return out

    return model.llm.register_forward_hook(hook)


@pytest.mark.parametrize("incremental", [True, False], ids=["cached", "recomputed"])
def test_greedy_generation_stops_on_the_end_of_turn_token(backbone_fixtures, incremental):
    """A terminator other than eos (<|eot_id|>) ends generation, and ids the resized original could not emit are
    never picked, on the cached path and on the full recomputation."""
    model = backbone_fixtures["llama3"]["model"]
    ids = model.tokenize(
        render_prompt([{"role": "user", "text": "hi"}, {"role": "assistant", "text": None}], "llava_llama_3")
    )

    def forced(k, row):
        row[:] = -10.0
        row[909 if k > 0 else 5] = 10.0

    handle = _steer_last_logits(model, forced)
    try:
        assert model.generate_greedy(ids, max_new_tokens=6, incremental=incremental) == [5, 909]
    finally:
        handle.remove()
    phi3 = backbone_fixtures["phi3"]["model"]

    def beyond(k, row):
        row[1010] = 1e4  # a padding row past len(tokenizer): the original had resized it away

    handle = _steer_last_logits(phi3, beyond)
    try:
        got = phi3.generate_greedy(
            phi3.tokenize("<|user|>\nhi<|end|>\n<|assistant|>\n"), max_new_tokens=3, incremental=incremental
        )
    finally:
        handle.remove()
    assert got and 1010 not in got


def _incremental_vs_full(model, prompts, max_new_tokens, atol):
    """Tokens identical and each step's logits row within ``atol``; returns how many cached steps were compared."""
    steps = 0
    for text, images in prompts:
        ids = model.tokenize(text)
        inc, inc_rows = model.generate_greedy(ids, images, max_new_tokens=max_new_tokens, return_logits=True)
        full, full_rows = model.generate_greedy(
            ids, images, max_new_tokens=max_new_tokens, incremental=False, return_logits=True
        )
        assert inc == full, text
        assert len(inc_rows) == len(full_rows) == len(inc)
        for a, b in zip(inc_rows, full_rows, strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=0)
        steps += len(inc) - 1
    return steps


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_incremental_generation_equals_full_recomputation(world, dtype, atol):
    """The cached continuation (one prompt forward, then one text-model step per token) gives the same tokens and,
    step by step, the same logits as re-running the whole spliced sequence for every token."""
    model = (
        world["model"]
        if dtype == torch.float32
        else OriginalVipLlava.from_dirs(world["original"], world["text"], world["vision"], dtype=dtype)
    )
    prompts = [
        ("USER: <image>\nWhat is shown? ASSISTANT:", [rand_image(40, 28, seed=8)]),
        (
            "USER: <image>\nWhat colour? <image>\nAnd here? ASSISTANT:",
            [rand_image(28, 30, seed=3), rand_image(31, 28, seed=4)],
        ),
        ("USER: Hello world! ASSISTANT:", None),
    ]
    # the eos row pushed down so that every prompt runs its full length through the cache
    handle = _steer_last_logits(model, lambda k, row: row.__setitem__(2, -1e4))
    try:
        steps = _incremental_vs_full(model, prompts, 8, atol)
    finally:
        handle.remove()
    assert steps == 3 * 7


def test_incremental_generation_on_the_tiny_fixtures(tiny, backbone_fixtures):
    """The same on the shared tiny fixtures of all three backbones (Vicuna, Llama-3 with GQA, Phi-3 with fused
    projections and a sliding window), as verify loads them (bf16, the checkpoints' own dtype), and in fp32."""
    from fixtures.build import sample_images

    img = [sample_images()["box"]]
    fixtures = {"vicuna": tiny, **{k: v["paths"] for k, v in backbone_fixtures.items()}}
    prompts = {
        "vicuna": "USER: <image>\nWhat is inside the red box? ASSISTANT:",
        "llama3": render_prompt(
            [{"role": "user", "text": "<image>\nWhat is inside the red box?"}, {"role": "assistant", "text": None}],
            "llava_llama_3",
        ),
        "phi3": render_prompt(
            [{"role": "user", "text": "<image>\nWhat is inside the red box?"}, {"role": "assistant", "text": None}],
            "llava_phi_3",
        ),
    }
    for name, paths in fixtures.items():
        for dtype, atol in ((torch.bfloat16, 5e-2), (torch.float32, 1e-5)):
            model = OriginalVipLlava.from_dirs(paths.original, paths.text_model, paths.vision_model, dtype=dtype)
            steps = _incremental_vs_full(model, [(prompts[name], img)], 6, atol)
            assert steps >= 1, f"{name}: generation stopped before any cached step"


# ------------------------------------------------------------------------------------------
# 7. the tokenizers, measured against the real transformers releases on the real vocabularies
#    (each release's Python: tests/era.py; skipped when there is none)
# ------------------------------------------------------------------------------------------

import random  # noqa: E402
import subprocess  # noqa: E402

from tests.era import ERA_VARS, era_python  # noqa: E402

HF_TOKENIZE = Path(__file__).with_name("hf_tokenize.py")


def random_prompts(n: int, specials: Sequence[str], seed: int = 0) -> list[str]:
    """Prompts mixing words, whitespace runs, newlines, tabs, non-ASCII, "\u2581", special tokens and <image>."""
    rng = random.Random(seed)
    words = [
        "What",
        "is",
        "shown",
        "in",
        "the",
        "image",
        "USER",
        "ASSISTANT",
        ":",
        "?",
        "Hello",
        "über",
        "漢字",
        "🙂",
        "123",
        "don't",
        "A",
        "a",
        "\u2581",
        "\u2581x",
        "x\u2581",
        "'s",
        "The picture has a smooth gradient",
    ]
    seps = [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "", ""]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            parts.append(rng.choice([*specials, "<image>"]) if rng.random() < 0.2 else rng.choice(words))
            parts.append(rng.choice(seps))
        s = "".join(parts)
        out.append(" " + s if rng.random() < 0.2 else s)
    return out


def transformers_ids(era: str, folder: Path, use_fast: bool, prompts: list[str]) -> dict:
    python = era_python(era)
    run = subprocess.run(
        [python, str(HF_TOKENIZE)],
        input=json.dumps({"folder": str(folder), "use_fast": use_fast, "prompts": prompts}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = run.stdout.rstrip("\n").rpartition("\n")[2]  # libraries may print lines of their own before it
    assert run.returncode == 0 and last.startswith("{"), f"{folder}: {run.stdout[:300]!r} {run.stderr[-2000:]}"
    got = json.loads(last)
    assert got["version"] == era, f"{python} runs transformers {got['version']}, not {era}"
    return got


def _vicuna_variants(base: Path, tmp_path: Path) -> dict[str, Path]:
    """The real Vicuna v1.5 folder, and variants of its tokenizer_config.json / special_tokens_map.json."""
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    stm = json.loads((base / "special_tokens_map.json").read_text())
    plain = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    flags = {k: v for k, v in cfg["eos_token"].items() if k != "__type"}
    variants = {
        "v1.5": (cfg, stm),
        "legacy true": ({**cfg, "legacy": True}, stm),
        "legacy absent": ({k: v for k, v in cfg.items() if k != "legacy"}, stm),
        "legacy null": ({**cfg, "legacy": None}, stm),
        "plain strings": ({**cfg, **plain}, plain),
        "plain strings, legacy": ({**cfg, **plain, "legacy": True}, plain),
        "eos strips": (
            {**cfg, "eos_token": {**cfg["eos_token"], "lstrip": True, "rstrip": True}},
            {**stm, "eos_token": {**flags, "lstrip": True, "rstrip": True}},
        ),
        "added_tokens_decoder": (
            {
                **cfg,
                "added_tokens_decoder": {
                    str(i): {
                        **{k: v for k, v in _added(c).items() if k != "__type"},
                        "special": True,
                        "rstrip": c == "</s>",
                    }
                    for i, c in enumerate(["<unk>", "<s>", "</s>"])
                },
            },
            stm,
        ),
    }
    out = {}
    for name, (c, m) in variants.items():
        d = tmp_path / name.replace(" ", "_").replace(",", "")
        d.mkdir()
        (d / "tokenizer.model").write_bytes((base / "tokenizer.model").read_bytes())
        (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in c.items()}))
        (d / "special_tokens_map.json").write_text(json.dumps(m))
        out[name] = d
    return out


@pytest.mark.parametrize("era", list(ERA_VARS))
def test_slow_tokenizer_equals_transformers_on_the_real_vocabulary(era, realvocab, tmp_path):
    """Each era's LlamaSlowTokenizer gives that transformers release's ids (use_fast=False) on the real Llama-2
    vocabulary, for Vicuna v1.5's tokenizer config and seven variants, over 400 random prompts each."""
    from verify.original import LlamaSlowTokenizer

    prompts = random_prompts(400, ["<s>", "</s>", "<unk>"], seed=1)
    for name, folder in _vicuna_variants(realvocab.base_tokenizer_dir("vicuna"), tmp_path).items():
        want = transformers_ids(era, folder, False, prompts)
        tok = LlamaSlowTokenizer(folder, era=era)
        bad = [p for p, w in zip(prompts, want["ids"], strict=True) if [tok.encode(c) for c in p.split("<image>")] != w]
        assert not bad, f"{name}: {len(bad)}/{len(prompts)} prompts differ from transformers {era}, e.g. {bad[0]!r}"
        assert len(tok) == want["len"]


def test_phi3_fast_tokenizer_equals_transformers_4_37_2(realvocab, tmp_path):
    """Phi-3 (use_fast=True in the original builder): the reference's FastTokenizer gives transformers 4.37.2's ids
    both from the base folder's tokenizer.json and from a slow-only folder (tokenizer.model, as LLaVA's train.py
    saves it), where 4.37.2 converts the sentencepiece model itself."""
    from verify.original import FastTokenizer

    base = realvocab.base_tokenizer_dir("phi3")
    slow_only = tmp_path / "phi3-slow-only"
    shutil.copytree(base, slow_only)
    (slow_only / "tokenizer.json").unlink()
    specials = ["<s>", "</s>", "<unk>", "<|user|>", "<|end|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]
    prompts = random_prompts(400, specials, seed=2) + [t for t, _ in realvocab.reference_cases("phi3")]
    for folder in (base, slow_only):
        want = transformers_ids("4.37.2", folder, True, prompts)
        tok = FastTokenizer(folder, "add_bos_token")
        bad = [p for p, w in zip(prompts, want["ids"], strict=True) if [tok.encode(c) for c in p.split("<image>")] != w]
        assert not bad, (
            f"{folder.name} ({tok.source}): {len(bad)}/{len(prompts)} differ from transformers 4.37.2, e.g. {bad[0]!r}"
        )
        assert len(tok) == want["len"] == 32011
