"""Conversation formats: ``llava/conversation.py`` ``Conversation.get_prompt()``, restated.

:func:`render_prompt` / :data:`CONV_MODES` restate ``get_prompt()`` for the modes the eval scripts used
(``llava_v1`` = SeparatorStyle.TWO, ``llava_llama_3`` = LLAMA_3, ``llava_phi_3`` = Phi_3), with the user text built
as ``"<image>\\n" + question`` (``llava/eval/model_vqa.py``).  The renderer reproduces, byte for byte, the strings
the original ``conversation.py`` printed (``tests/test_reference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

SYSTEM_LLAVA_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_VIP_V3 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
ROLES = ("user", "assistant")  # our turn roles, mapped onto each mode's own spelling


@dataclass(frozen=True)
class ConversationMode:
    """One ``conv_templates`` entry: the fields ``get_prompt()`` reads, and how it joins them."""

    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant) as the original spells them
    style: str  # the SeparatorStyle's branch of get_prompt(): "two" | "llama_3" | "phi_3"
    sep: str
    sep2: str | None


def _render_two(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> str:
    # SeparatorStyle.TWO: system + sep; "role: msg" + [sep, sep2][i % 2]; an empty turn is "role:".
    seps = (mode.sep, mode.sep2)
    ret = mode.system + seps[0]
    for i, (role, msg) in enumerate(messages):
        ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return ret


def _first_turn_rule(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> None:
    # get_prompt() asserts this for LLAMA_3 and Phi_3.
    if messages and (not messages[0][1] or messages[0][0] != mode.roles[0]):
        raise ValueError(f"{mode.name}: the first message must be a non-empty user message (get_prompt asserts it)")


def _render_llama_3(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> str:
    # SeparatorStyle.LLAMA_3: sep/sep2 unused; the literal <|begin_of_text|> opens the system block.
    _first_turn_rule(mode, messages)
    ret = (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{mode.system}<|eot_id|>" if mode.system else ""
    )
    for role, msg in messages:
        ret += "<|start_header_id|>" + role + "<|end_header_id|>\n\n"
        if msg:
            ret += msg + ("" if "<|eot_id|>" in msg else "<|eot_id|>")
    return ret


def _render_phi_3(mode: ConversationMode, messages: list[tuple[str, str | None]]) -> str:
    # SeparatorStyle.Phi_3: no BOS in the text; '<|end|>\n' is skipped only when the message holds
    # '<|eot_id|>' (the original's copy of the LLAMA_3 branch).
    _first_turn_rule(mode, messages)
    ret = f"<|system|>\n{mode.system}<|end|>\n" if mode.system else ""
    for role, msg in messages:
        ret += f"<|{role}|>" + "\n"
        if msg:
            ret += msg + ("" if "<|eot_id|>" in msg else "<|end|>\n")
    return ret


_STYLES: Mapping[str, Callable[[ConversationMode, list[tuple[str, str | None]]], str]] = {
    "two": _render_two,
    "llama_3": _render_llama_3,
    "phi_3": _render_phi_3,
}

CONV_MODES: Mapping[str, ConversationMode] = {
    m.name: m
    for m in (
        ConversationMode("llava_v1", SYSTEM_LLAVA_V1, ("USER", "ASSISTANT"), "two", " ", "</s>"),
        ConversationMode(
            "llava_llama_3", SYSTEM_VIP_V3, ("user", "assistant"), "llama_3", "<|begin_of_text|>", "<|end_of_text|>"
        ),
        ConversationMode("llava_phi_3", SYSTEM_VIP_V3, ("user", "assistant"), "phi_3", "", "<|end|>"),
    )
}


def _turn(t: Any) -> tuple[str, str | None]:
    if isinstance(t, Mapping):
        role, text = t.get("role"), t.get("text")
    elif isinstance(t, (tuple, list)) and len(t) == 2:
        role, text = t
    else:
        raise ValueError(f"a turn is {{'role', 'text'}} or (role, text), got {t!r}")
    if role not in ROLES:
        raise ValueError(f"turn role {role!r}: expected one of {ROLES}")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"turn text must be a string or None, got {text!r}")
    return role, text


def render_prompt(turns: Sequence[Any], mode: str) -> str:
    """The prompt string ``Conversation.get_prompt()`` returns for ``turns`` in conversation ``mode``.

    ``turns``: ``{"role": "user" | "assistant", "text": str | None}`` (or ``(role, text)``) in order,
    as ``conv.append_message(conv.roles[i], text)`` would have added them; a None (or empty) text is
    the open turn the model answers.  The first user text of an image prompt is
    ``"<image>\n" + question``, as the eval scripts built it.
    """
    if mode not in CONV_MODES:
        raise ValueError(f"conversation mode {mode!r}: expected one of {sorted(CONV_MODES)}")
    m = CONV_MODES[mode]
    role_names = dict(zip(ROLES, m.roles, strict=True))
    messages = [(role_names[r], text) for r, text in map(_turn, turns)]
    return _STYLES[m.style](m, messages)
