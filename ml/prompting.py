"""Prompts: one place that turns (instruction, customer message, history) into model input.

Training, evaluation and generation all go through these functions so that a fine-tuned
model is always asked in exactly the format it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from csra.specs import GROUNDING_TEMPLATE, Tone

# Each tone is one documented system-prompt rule (README, "Tone and privacy").
TONE_RULES: dict[Tone, str] = {
    "neutral": "Use a neutral, clear tone.",
    "friendly": "Use a warm, friendly tone; a short empathetic phrase is welcome.",
    "strict_professional": "Use a strictly professional tone: formal, concise, no small talk.",
}

PRIVACY_ON = (
    "Ask for an order number, account details or an email address only if the request cannot "
    "be handled without them."
)
PRIVACY_OFF = "Never ask the customer for an order number, account details or an email address."


def system_message(
    instruction: str, tone: Tone | None = None, ask_details_only_if_relevant: bool | None = None
) -> str:
    """The system message: the dataset's agent instruction, plus optional tone and privacy rules."""
    parts = [instruction.strip()]
    if tone:
        parts.append(TONE_RULES[tone])
    if ask_details_only_if_relevant is True:
        parts.append(PRIVACY_ON)
    elif ask_details_only_if_relevant is False:
        parts.append(PRIVACY_OFF)
    return " ".join(p for p in parts if p)


def build_messages(
    system: str, user_message: str, history: Sequence[dict[str, str]] = ()
) -> list[dict[str, str]]:
    """Chat messages with an explicit system message (SmolLM2 inserts a default one otherwise)."""
    msgs = [{"role": "system", "content": system}]
    msgs.extend({"role": m["role"], "content": m["content"]} for m in history)
    msgs.append({"role": "user", "content": user_message})
    return msgs


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text the model sees before its reply.

    Models with a chat template (SmolLM2 and other instruct models) use it with the generation
    prompt appended; others (T5, plain LMs) get a plain transcript ending in ``Agent:``.
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    lines = []
    for m in messages:
        role = {"system": "Instruction", "user": "Customer", "assistant": "Agent"}[m["role"]]
        lines.append(f"{role}: {m['content']}")
    lines.append("Agent:")
    return "\n".join(lines)


def truncate_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (exemplars are cut so prompts stay short)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else str(tokenizer.decode(ids[:max_tokens])).strip() + " ..."


def grounded_system(system: str, exemplars: Sequence[str], template: str = GROUNDING_TEMPLATE) -> str:
    """The system message with the approved answers a grounded model is shown (numbered, best first)."""
    if not exemplars:
        return system
    listed = "\n".join(f"[{i}] {text}" for i, text in enumerate(exemplars, start=1))
    return f"{system}\n\n{template.replace('{exemplars}', listed)}"


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def conversation_prompt(tokenizer: Any, system: str, messages: Sequence[dict[str, str]],
                        max_tokens: int | None = None) -> str:
    """The prompt for a conversation (``messages`` end with the customer's turn) that fits ``max_tokens``.

    The oldest turns are dropped first, a question with its answer at a time; the system message
    (the agent instruction with the tone and privacy rules) and the customer's last message always
    stay. ``max_tokens`` None: no limit (models with relative positions, such as T5).
    """
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a conversation ends with the customer's message")
    history, last = turns[:-1], turns[-1]
    while True:
        prompt = render_prompt(tokenizer, build_messages(system, last["content"], history))
        if max_tokens is None or not history or count_tokens(tokenizer, prompt) <= max_tokens:
            return prompt
        pair = len(history) >= 2 and history[0]["role"] == "user" and history[1]["role"] == "assistant"
        history = history[2:] if pair else history[1:]


def example_prompt(tokenizer: Any, instruction: str, customer_message: str, exemplars: Sequence[str] = (),
                   template: str = GROUNDING_TEMPLATE) -> str:
    """The prompt for one dataset example (training and evaluation); grounded when given ``exemplars``."""
    system = grounded_system(system_message(instruction), exemplars, template)
    return render_prompt(tokenizer, build_messages(system, customer_message))


def end_token_ids(tokenizer: Any, arch: str) -> list[int]:
    """The token(s) that end a reply: the chat template's end-of-turn (``<|im_end|>``) or eos."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if arch != "causal" or not has_chat_template(tokenizer):
        return eos
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marker = "\x1fREPLY\x1f"
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": marker}], tokenize=False)
    if not full.startswith(prompt + marker):
        return eos
    end_text = full[len(prompt) + len(marker):].strip()
    return tokenizer(end_text, add_special_tokens=False)["input_ids"] if end_text else eos


def turn_marker_ids(tokenizer: Any, arch: str) -> list[int]:
    """The special tokens the chat template writes around turns (``<|im_start|>``, ``<|im_end|>``).

    A reply never holds one: a model that writes one has ended its turn, even where it skipped the
    end-of-turn token (or was not yet allowed it) and began the next turn's ``<|im_start|>user``.
    Decoding drops special tokens from the text, so without this that next turn reached the agent
    as a reply ending "... Thank you.user" followed by an invented customer message.
    """
    if arch != "causal" or not has_chat_template(tokenizer):
        return []
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    special = {int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return sorted({int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]} & special)
