"""The text backbones ViP-LLaVA was trained on, one small description each.

Everything that differs between Vicuna, Llama-3-8B and Phi-3-mini lives here as data: the original config's
``model_type``, the decoder-layer key rules, the text config the converted model gets, how the tokenizer is
rebuilt, the original conversation format (as a chat template), and the end-of-turn tokens generation stops on.
The pipeline asks :func:`detect` (or ``--backbone``) for one and never branches on the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConversionError

_LM = "language_model.model.layers.{}."

LayerRules = tuple[tuple[str, str, str | None], ...]


def _layer_rules(parts: dict[str, str]) -> LayerRules:
    """Rules for decoder-layer projections kept under the same name: {rule name: module path}."""
    return tuple((f"text.{name}", f"model.layers.{{}}.{p}.weight", f"{_LM}{p}.weight") for name, p in parts.items())


LLAMA_LAYER_RULES = _layer_rules(
    {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
)
# Phi-3 keeps q/k/v and gate/up fused; transformers' Phi3 has the same fused layout, so nothing is split.
PHI3_LAYER_RULES = _layer_rules(
    {
        "qkv": "self_attn.qkv_proj",
        "o": "self_attn.o_proj",
        "gate_up": "mlp.gate_up_proj",
        "down": "mlp.down_proj",
    }
)


def _content() -> str:
    """Jinja: the text of one message, as the original built it: one '<image>\\n' per image item, then the text."""
    return (
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set text = ('<image>\\n' * (message['content'] | selectattr('type', 'equalto', 'image') | "
        "list | length))"
        " + (message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) -%}"
        "{%- endif -%}"
    )


def _system(default: str) -> str:
    """Jinja: ns.system is the default system text, or the messages' own leading system message."""
    return (
        "{%- set ns = namespace(system='" + default.replace("'", "\\'") + "', start=0) -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join(' ') -%}{%- endif -%}"
        "{%- set ns.start = 1 -%}"
        "{%- endif -%}"
    )


SYSTEM_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_V3 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)

# llava_v1 (SeparatorStyle.TWO): system + " ", then "USER: text " / "ASSISTANT: text</s>"; the open turn "ASSISTANT:".
CHAT_TEMPLATE_V1 = (
    _system(SYSTEM_V1) + "{{- ns.system + ' ' -}}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
    "{%- else -%}{{- raise_exception('llava_v1 has only user and assistant turns after the system message') -}}"
    "{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- ' ' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# llava_llama_3 (SeparatorStyle.LLAMA_3). The literal <|begin_of_text|> is part of the original prompt TEXT; the
# tokenizer adds its own BOS in front, exactly as the original's tokenizer did (two BOS ids, as trained).
CHAT_TEMPLATE_LLAMA_3 = (
    _system(SYSTEM_V3)
    + "{%- if ns.system -%}{{- '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + "
    "'<|eot_id|>' -}}{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}"
    + _content()
    + "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if text -%}{{- text -}}{%- if '<|eot_id|>' not in text -%}{{- '<|eot_id|>' -}}{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# llava_phi_3 (SeparatorStyle.Phi_3). The original appends '<|end|>\n' unless the text holds '<|eot_id|>' (sic).
CHAT_TEMPLATE_PHI_3 = (
    _system(SYSTEM_V3) + "{%- if ns.system -%}{{- '<|system|>\\n' + ns.system + '<|end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages[ns.start:] -%}" + _content() + "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if text -%}{{- text -}}{%- if '<|eot_id|>' not in text -%}{{- '<|end|>\\n' -}}{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


_LLAMA_FIELDS = (("attention_bias", False), ("mlp_bias", False), ("head_dim", None), ("pretraining_tp", 1))


@dataclass(frozen=True)
class Backbone:
    """What one text backbone needs from the converter."""

    name: str
    title: str
    original_model_type: str  # model_type in the ORIGINAL config.json
    marker_token: str | None  # a token only this backbone's tokenizer has (tells apart backbones sharing a model_type)
    text_model_type: str  # the converted text_config's model_type
    text_architecture: str
    layer_rules: LayerRules
    text_fields: tuple[tuple[str, object], ...]  # backbone-only text_config keys copied from the original (default)
    tokenizer_kind: str  # "sentencepiece": legacy dummy prefix on every segment | "byte_level": kept as is
    tokenizer_class: str  # tokenizer_class written to tokenizer_config.json
    rows_padded: bool  # the original embedding has padding rows beyond the tokenizer (Phi-3: 32064 > 32011)
    original_tokenizer: str  # what the original inference used: "slow" (sentencepiece) or "fast"
    conv_mode: str  # the original conversation mode (llava/conversation.py)
    chat_template: str
    stop_tokens: tuple[str, ...]  # end-of-turn tokens generation stops on, besides the tokenizer's eos
    license_id: str  # the Hub license id of the base model's terms
    license_name: str
    license_url: str

    def render(self, messages: list[dict], add_generation_prompt: bool = True, eos_token: str = "</s>") -> str:
        """The chat template applied to ``messages`` (what transformers' apply_chat_template gives)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str):
            raise ValueError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token
        )

    def prompt_for(self, question: str) -> str:
        """The original single-turn prompt for one image and ``question``."""
        return self.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])


VICUNA = Backbone(
    name="vicuna",
    title="Vicuna-1.5 (Llama-2)",
    original_model_type="llava_llama",
    marker_token=None,
    text_model_type="llama",
    text_architecture="LlamaForCausalLM",
    layer_rules=LLAMA_LAYER_RULES,
    text_fields=_LLAMA_FIELDS,
    tokenizer_kind="sentencepiece",
    tokenizer_class="PreTrainedTokenizerFast",  # 5.x's LlamaTokenizer class would rebuild the pipeline (processor.py)
    rows_padded=False,
    original_tokenizer="slow",
    conv_mode="llava_v1",
    chat_template=CHAT_TEMPLATE_V1,
    stop_tokens=(),
    license_id="llama2",
    license_name="Llama 2 Community License",
    license_url="https://ai.meta.com/llama/license/",
)
LLAMA3 = Backbone(
    name="llama3",
    title="Llama-3-8B-Instruct",
    original_model_type="llava_llama",
    marker_token="<|eot_id|>",
    text_model_type="llama",
    text_architecture="LlamaForCausalLM",
    layer_rules=LLAMA_LAYER_RULES,
    text_fields=_LLAMA_FIELDS,
    tokenizer_kind="byte_level",
    tokenizer_class="PreTrainedTokenizerFast",
    rows_padded=False,
    original_tokenizer="fast",
    conv_mode="llava_llama_3",
    chat_template=CHAT_TEMPLATE_LLAMA_3,
    stop_tokens=("<|eot_id|>",),
    license_id="llama3",
    license_name="Meta Llama 3 Community License",
    license_url="https://llama.meta.com/llama3/license/",
)
PHI3 = Backbone(
    name="phi3",
    title="Phi-3-mini-4k-instruct",
    original_model_type="llava_phi3",
    marker_token=None,
    text_model_type="phi3",
    text_architecture="Phi3ForCausalLM",
    layer_rules=PHI3_LAYER_RULES,
    text_fields=(
        ("original_max_position_embeddings", None),
        ("sliding_window", None),
        ("resid_pdrop", 0.0),
        ("embd_pdrop", 0.0),
    ),
    tokenizer_kind="sentencepiece",
    tokenizer_class="PreTrainedTokenizerFast",  # 5.x's LlamaTokenizer class would rebuild the pipeline (processor.py)
    rows_padded=True,
    original_tokenizer="fast",
    conv_mode="llava_phi_3",
    chat_template=CHAT_TEMPLATE_PHI_3,
    stop_tokens=("<|end|>",),
    license_id="mit",
    license_name="MIT License (Phi-3)",
    license_url="https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/LICENSE",
)

BACKBONES: dict[str, Backbone] = {b.name: b for b in (VICUNA, LLAMA3, PHI3)}


def by_name(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ConversionError(f"--backbone {name!r}: expected one of auto, {', '.join(BACKBONES)}")
    return BACKBONES[name]


def detect(original_cfg: dict, vocab: Mapping[str, int], where: str, forced: str | None = None) -> Backbone:
    """The backbone of an original checkpoint, from its config's model_type and its tokenizer; ``forced`` (the
    ``--backbone`` flag) must agree with the config."""
    mt = original_cfg.get("model_type")
    candidates = [b for b in BACKBONES.values() if b.original_model_type == mt]
    if forced is not None and forced != "auto":
        chosen = by_name(forced)
        if chosen.original_model_type != mt:
            raise ConversionError(
                f"{where}: model_type is {mt!r} but --backbone {forced} expects {chosen.original_model_type!r}; "
                "drop --backbone or pass the matching checkpoint"
            )
        return chosen
    if not candidates:
        known = sorted({b.original_model_type for b in BACKBONES.values()})
        raise ConversionError(
            f"{where}: model_type {mt!r} is not a ViP-LLaVA backbone this tool knows (expected one of "
            f"{', '.join(known)})"
        )
    marked = [b for b in candidates if b.marker_token is not None and b.marker_token in vocab]
    if marked:
        return marked[0]
    plain = [b for b in candidates if b.marker_token is None]
    return plain[0]


def shared_layer_rules(original_cfg: dict, forced: str | None = None) -> LayerRules | None:
    """The decoder-layer rules of the backbone :func:`detect` will choose, known before the tokenizer is read: the
    rules every backbone the config's model_type (or ``forced``) allows has in common; None where they differ, or
    where :func:`detect` will refuse the config."""
    mt = original_cfg.get("model_type")
    if forced is not None and forced != "auto":
        chosen = BACKBONES.get(forced)
        return chosen.layer_rules if chosen is not None and chosen.original_model_type == mt else None
    rules = {b.layer_rules for b in BACKBONES.values() if b.original_model_type == mt}
    return rules.pop() if len(rules) == 1 else None
