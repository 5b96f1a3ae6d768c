"""Conversation templates: how a chat turns into the exact prompt text a model was trained on.

A template is data, not code: gen_config embeds the whole object in mlc-chat-config.json, so the
runtime renders prompts for a new template without any change to mlcc.

Rendering rules (`render_prompt`):
- The system block is `system_template` with `{system_message}` replaced; it is left out when the
  system message is empty, so formats that have no system turn stay exact.
- Each message with content becomes `role + role_content_sep + content + sep`, where `sep` is
  `seps[0]` after a user turn and `seps[-1]` after an assistant turn. `role_templates` may wrap the
  content (`"{user_message}"` is the placeholder of the user role).
- The first message carries no role prefix when a system block was written and
  `add_role_after_system_message` is false (Llama-2 and Mistral put the first question inside the
  system block's `[INST]`).
- A last message `("assistant", None)` asks for the reply: `role + role_empty_sep`.
- `system_prefix_token_ids` (usually BOS) go before the encoded text; the text itself is meant to
  be encoded without the tokenizer's own special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mlcc.errors import MlccError

STAGE = "conv_template"
SYSTEM_PLACEHOLDER = "{system_message}"
ROLES = ("user", "assistant")

# Order of the keys in the JSON form; mlc-chat-config.json keeps it.
JSON_FIELDS = (
    "name",
    "system_template",
    "system_message",
    "system_prefix_token_ids",
    "roles",
    "role_templates",
    "seps",
    "role_content_sep",
    "role_empty_sep",
    "stop_str",
    "stop_token_ids",
    "add_role_after_system_message",
)
_OPTIONAL_DEFAULTS: dict[str, Any] = {
    "system_message": "",
    "system_prefix_token_ids": [],
    "role_templates": {},
    "stop_str": [],
    "stop_token_ids": [],
    "add_role_after_system_message": True,
}


def _placeholder(role: str) -> str:
    return "{" + role + "_message}"


@dataclass(frozen=True)
class ConvTemplate:
    """One chat format; see the module docstring for how it renders."""

    name: str
    system_template: str
    system_message: str
    roles: Mapping[str, str] = field(hash=False)
    seps: tuple[str, ...]
    role_content_sep: str
    role_empty_sep: str
    stop_str: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    system_prefix_token_ids: tuple[int, ...] = ()
    add_role_after_system_message: bool = True
    role_templates: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ConvTemplate:
        """Build a template from its JSON object, checking every field."""
        if not isinstance(d, Mapping):
            raise MlccError(STAGE, f"a template must be a JSON object, got {type(d).__name__}")
        name = d.get("name", "<unnamed>")
        unknown = sorted(set(d) - set(JSON_FIELDS))
        if unknown:
            raise MlccError(
                STAGE, f"{name}: unknown keys {unknown}; allowed keys are {list(JSON_FIELDS)}"
            )
        missing = [k for k in JSON_FIELDS if k not in d and k not in _OPTIONAL_DEFAULTS]
        if missing:
            raise MlccError(STAGE, f"{name}: missing keys {missing}; add them to the template")
        values = {k: d.get(k, _OPTIONAL_DEFAULTS.get(k)) for k in JSON_FIELDS}
        _check_json_types(values)
        template = cls(
            name=values["name"],
            system_template=values["system_template"],
            system_message=values["system_message"],
            roles=dict(values["roles"]),
            seps=tuple(values["seps"]),
            role_content_sep=values["role_content_sep"],
            role_empty_sep=values["role_empty_sep"],
            stop_str=tuple(values["stop_str"]),
            stop_token_ids=tuple(values["stop_token_ids"]),
            system_prefix_token_ids=tuple(values["system_prefix_token_ids"]),
            add_role_after_system_message=values["add_role_after_system_message"],
            role_templates=dict(values["role_templates"]),
        )
        template.validate()
        return template

    def to_json(self) -> dict[str, Any]:
        """The JSON object embedded in mlc-chat-config.json (keys in `JSON_FIELDS` order)."""
        return {
            "name": self.name,
            "system_template": self.system_template,
            "system_message": self.system_message,
            "system_prefix_token_ids": list(self.system_prefix_token_ids),
            "roles": dict(self.roles),
            "role_templates": dict(self.role_templates),
            "seps": list(self.seps),
            "role_content_sep": self.role_content_sep,
            "role_empty_sep": self.role_empty_sep,
            "stop_str": list(self.stop_str),
            "stop_token_ids": list(self.stop_token_ids),
            "add_role_after_system_message": self.add_role_after_system_message,
        }

    def validate(self) -> None:
        """Raise MlccError naming the first field that breaks a rule of the format."""
        if not self.name:
            raise MlccError(STAGE, "a template needs a non-empty name")
        if SYSTEM_PLACEHOLDER not in self.system_template:
            raise MlccError(
                STAGE,
                f"{self.name}: system_template {self.system_template!r} must contain "
                f"{SYSTEM_PLACEHOLDER!r}",
            )
        missing_roles = [r for r in ROLES if r not in self.roles]
        if missing_roles:
            raise MlccError(
                STAGE, f"{self.name}: roles {dict(self.roles)} lack {missing_roles}; add them"
            )
        if len(self.seps) not in (1, 2):
            raise MlccError(
                STAGE,
                f"{self.name}: seps must hold 1 or 2 strings (after user, after assistant), "
                f"got {len(self.seps)}",
            )
        for role, text in self.role_templates.items():
            if role not in self.roles or _placeholder(role) not in text:
                raise MlccError(
                    STAGE,
                    f"{self.name}: role_templates[{role!r}] = {text!r} must name a known role "
                    f"and contain {_placeholder(role)!r}",
                )

    def with_system_message(self, system_message: str) -> ConvTemplate:
        """The same template with another system message."""
        return replace(self, system_message=system_message)


def _check_json_types(values: Mapping[str, Any]) -> None:
    name = values["name"]
    str_keys = ("name", "system_template", "system_message", "role_content_sep", "role_empty_sep")
    for key in str_keys:
        if not isinstance(values[key], str):
            raise MlccError(STAGE, f"{name}: {key} must be a string, got {values[key]!r}")
    for key in ("roles", "role_templates"):
        mapping = values[key]
        if not isinstance(mapping, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise MlccError(STAGE, f"{name}: {key} must map strings to strings, got {mapping!r}")
    for key in ("seps", "stop_str"):
        items = values[key]
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise MlccError(STAGE, f"{name}: {key} must be a list of strings, got {items!r}")
    for key in ("stop_token_ids", "system_prefix_token_ids"):
        items = values[key]
        ok = isinstance(items, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
        )
        if not ok:
            raise MlccError(
                STAGE, f"{name}: {key} must be a list of token ids (ints >= 0), got {items!r}"
            )
    if not isinstance(values["add_role_after_system_message"], bool):
        raise MlccError(
            STAGE,
            f"{name}: add_role_after_system_message must be true or false, "
            f"got {values['add_role_after_system_message']!r}",
        )


def render_prompt(template: ConvTemplate, messages: Sequence[tuple[str, str | None]]) -> str:
    """Render a conversation into prompt text.

    `messages` are `(role, content)` pairs with roles "user" and "assistant"; a first
    `("system", text)` pair replaces the template's system message. Only the last message may have
    content None, and it must be the assistant's: the text then ends with the reply prompt.
    """
    messages = list(messages)
    system_message = template.system_message
    if messages and messages[0][0] == "system":
        system_message = _message_text(template, 0, messages[0])
        messages = messages[1:]
    parts: list[str] = []
    if system_message:
        parts.append(template.system_template.replace(SYSTEM_PLACEHOLDER, system_message))
    sep_after = {"user": template.seps[0], "assistant": template.seps[-1]}
    for i, (role, content) in enumerate(messages):
        if role not in template.roles:
            raise MlccError(
                STAGE,
                f"{template.name}: message {i} has role {role!r}; known roles are "
                f"{sorted(template.roles)} (and 'system' first)",
            )
        if content is None:
            if i != len(messages) - 1 or role != "assistant":
                raise MlccError(
                    STAGE,
                    f"{template.name}: message {i} ({role}) has no content; only a last "
                    "assistant message may be empty (it asks for the reply)",
                )
            parts.append(template.roles[role] + template.role_empty_sep)
            continue
        content = _message_text(template, i, (role, content))
        skip_role = i == 0 and bool(system_message) and not template.add_role_after_system_message
        prefix = "" if skip_role else template.roles[role] + template.role_content_sep
        wrapped = template.role_templates.get(role, _placeholder(role))
        body = wrapped.replace(_placeholder(role), content)
        parts.append(prefix + body + sep_after.get(role, template.seps[0]))
    return "".join(parts)


def _message_text(template: ConvTemplate, index: int, message: tuple[str, Any]) -> str:
    if not isinstance(message[1], str):
        raise MlccError(
            STAGE,
            f"{template.name}: message {index} ({message[0]}) content must be a string, "
            f"got {type(message[1]).__name__}",
        )
    return message[1]


_LLAMA2_SYSTEM = "<s>[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n"
_STABLELM_ALPHA_SYSTEM = (
    "# StableLM Tuned (Alpha version)\n"
    "- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.\n"
    "- StableLM is excited to be able to help the user, but will refuse to do anything that could "
    "be considered harmful to the user.\n"
    "- StableLM is more than just an information source, StableLM is also able to write poetry, "
    "short stories, and make jokes.\n"
    "- StableLM will refuse to participate in anything that could harm a human."
)


def _plain(name: str, stop_str: list[str], stop_ids: list[int], prefix: list[int]) -> dict:
    """A template without roles: the conversation is plain text continued by the model."""
    return {
        "name": name,
        "system_template": SYSTEM_PLACEHOLDER,
        "system_message": "",
        "system_prefix_token_ids": prefix,
        "roles": {"user": "", "assistant": ""},
        "seps": [""],
        "role_content_sep": "",
        "role_empty_sep": "",
        "stop_str": stop_str,
        "stop_token_ids": stop_ids,
    }


# Formats as published by the model authors. Llama-2 writes BOS as text ("<s>") because every turn
# starts with it; templates whose BOS comes only once put it in system_prefix_token_ids instead.
_TEMPLATE_DATA: tuple[dict[str, Any], ...] = (
    _plain("LM", ["</s>"], [2], [1]),
    {
        "name": "llama-2",
        "system_template": _LLAMA2_SYSTEM,
        "system_message": "You are a helpful, respectful and honest assistant.",
        "roles": {"user": "<s>[INST]", "assistant": "[/INST]"},
        "seps": [" ", " </s>"],
        "role_content_sep": " ",
        "role_empty_sep": "",
        "stop_str": ["[INST]", "</s>"],
        "stop_token_ids": [2],
        "add_role_after_system_message": False,
    },
    {
        "name": "llama-3",
        "system_template": (
            "<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>"
        ),
        "system_message": "You are a helpful, respectful and honest assistant.",
        "system_prefix_token_ids": [128000],
        "roles": {"user": "<|start_header_id|>user", "assistant": "<|start_header_id|>assistant"},
        "seps": ["<|eot_id|>"],
        "role_content_sep": "<|end_header_id|>\n\n",
        "role_empty_sep": "<|end_header_id|>\n\n",
        "stop_str": ["<|eot_id|>", "<|end_of_text|>"],
        "stop_token_ids": [128001, 128009],
    },
    {
        "name": "mistral_default",
        # Mistral has no system turn; its documented guardrail prompt leads the first [INST].
        "system_template": "[INST] {system_message}\n\n",
        "system_message": (
            "Always assist with care, respect, and truth. Respond with utmost utility yet "
            "securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure replies "
            "promote fairness and positivity."
        ),
        "system_prefix_token_ids": [1],
        "roles": {"user": "[INST]", "assistant": "[/INST]"},
        "seps": [" ", "</s>"],
        "role_content_sep": " ",
        "role_empty_sep": "",
        "stop_str": ["</s>"],
        "stop_token_ids": [2],
        "add_role_after_system_message": False,
    },
    {
        "name": "redpajama_chat",
        "system_template": SYSTEM_PLACEHOLDER,
        "roles": {"user": "<human>", "assistant": "<bot>"},
        "seps": ["\n"],
        "role_content_sep": ": ",
        "role_empty_sep": ":",
        "stop_str": ["<human>"],
        "stop_token_ids": [0],
    },
    {
        "name": "chatml",
        "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
        "system_message": (
            "A conversation between a user and an LLM-based AI assistant. The assistant gives "
            "helpful and honest answers."
        ),
        "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|im_end|>"],
        "stop_token_ids": [2, 32000],
    },
    {
        "name": "phi-2",
        "system_template": SYSTEM_PLACEHOLDER,
        "roles": {"user": "Instruct", "assistant": "Output"},
        "seps": ["\n"],
        "role_content_sep": ": ",
        "role_empty_sep": ":",
        "stop_str": ["<|endoftext|>"],
        "stop_token_ids": [50256],
    },
    {
        "name": "vicuna_v1.1",
        "system_template": "{system_message} ",
        "system_message": (
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        "system_prefix_token_ids": [1],
        "roles": {"user": "USER", "assistant": "ASSISTANT"},
        "seps": [" ", "</s>"],
        "role_content_sep": ": ",
        "role_empty_sep": ":",
        "stop_str": ["</s>"],
        "stop_token_ids": [2],
    },
    {
        "name": "gemma_instruction",
        # Gemma has no system turn; a system message opens the first user turn.
        "system_template": "<start_of_turn>user\n{system_message}\n\n",
        "system_prefix_token_ids": [2],
        "roles": {"user": "<start_of_turn>user", "assistant": "<start_of_turn>model"},
        "seps": ["<end_of_turn>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<end_of_turn>"],
        "stop_token_ids": [1, 107],
        "add_role_after_system_message": False,
    },
    {
        "name": "qwen2",
        "system_template": "<|im_start|>system\n{system_message}<|im_end|>\n",
        "system_message": "You are a helpful assistant.",
        "roles": {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"},
        "seps": ["<|im_end|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|endoftext|>", "<|im_end|>"],
        "stop_token_ids": [151643, 151645],
    },
    {
        "name": "codellama_instruct",
        "system_template": _LLAMA2_SYSTEM,
        "roles": {"user": "<s>[INST]", "assistant": "[/INST]"},
        "seps": [" ", " </s>"],
        "role_content_sep": " ",
        "role_empty_sep": "",
        "stop_str": ["</s>"],
        "stop_token_ids": [2],
        "add_role_after_system_message": False,
    },
    _plain("codellama_completion", ["</s>"], [2], [1]),
    _plain("gpt2", ["<|endoftext|>"], [50256], []),
    {
        "name": "stablelm",
        "system_template": "<|SYSTEM|>{system_message}",
        "system_message": _STABLELM_ALPHA_SYSTEM,
        "roles": {"user": "<|USER|>", "assistant": "<|ASSISTANT|>"},
        "seps": [""],
        "role_content_sep": "",
        "role_empty_sep": "",
        "stop_str": ["<|USER|>", "<|SYSTEM|>", "<|endoftext|>"],
        "stop_token_ids": [50278, 50279, 50277, 1, 0],
    },
    {
        "name": "stablelm-3b",
        "system_template": "<|system|>\n{system_message}<|endoftext|>\n",
        "roles": {"user": "<|user|>", "assistant": "<|assistant|>"},
        "seps": ["<|endoftext|>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["<|endoftext|>"],
        "stop_token_ids": [0],
    },
    {
        "name": "tinyllama_v1_0",
        "system_template": "<|system|>\n{system_message}</s>\n",
        "system_message": "You are a helpful chatbot.",
        "system_prefix_token_ids": [1],
        "roles": {"user": "<|user|>", "assistant": "<|assistant|>"},
        "seps": ["</s>\n"],
        "role_content_sep": "\n",
        "role_empty_sep": "\n",
        "stop_str": ["</s>"],
        "stop_token_ids": [2],
    },
    {
        "name": "dolly",
        "system_template": "{system_message}\n\n",
        "system_message": (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request."
        ),
        "roles": {"user": "### Instruction", "assistant": "### Response"},
        "seps": ["\n\n", "\n\n### End\n\n"],
        "role_content_sep": ":\n",
        "role_empty_sep": ":\n",
        "stop_str": ["### End"],
        "stop_token_ids": [50277],
    },
    {
        "name": "oasst",
        "system_template": "<|system|>{system_message}<|endoftext|>",
        "roles": {"user": "<|prompter|>", "assistant": "<|assistant|>"},
        "seps": ["<|endoftext|>"],
        "role_content_sep": "",
        "role_empty_sep": "",
        "stop_str": ["<|endoftext|>"],
        "stop_token_ids": [0],
    },
)

TEMPLATES: dict[str, ConvTemplate] = {d["name"]: ConvTemplate.from_json(d) for d in _TEMPLATE_DATA}


def get_template(name: str) -> ConvTemplate:
    """The built-in template called `name` (MlccError listing the known names otherwise)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise MlccError(
            STAGE,
            f"unknown conversation template {name!r}; known templates: {', '.join(TEMPLATES)}",
        ) from None
