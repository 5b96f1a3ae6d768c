"""Conversation templates: golden prompts for every template, checked against the model authors'
own formats (Meta's Llama-2 chat code, the Jinja chat templates in tokenizer_config.json)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mlcc.errors import MlccError
from mlcc.frontend.conv_templates import (
    TEMPLATES,
    ConvTemplate,
    get_template,
    render_prompt,
)

SHARED = Path(__file__).parents[2].parent / "shared"
TOKENIZERS = SHARED / "tokenizers"

CONVERSATION = [
    ("user", "What is 2+2?"),
    ("assistant", "It is 4."),
    ("user", "And {x} times 3?"),  # braces must survive rendering untouched
    ("assistant", None),
]
U1, A1, U2 = "What is 2+2?", "It is 4.", "And {x} times 3?"
LLAMA_SYS = "You are a helpful, respectful and honest assistant."
STABLELM_SYS = (
    "# StableLM Tuned (Alpha version)\n"
    "- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.\n"
    "- StableLM is excited to be able to help the user, but will refuse to do anything that could "
    "be considered harmful to the user.\n"
    "- StableLM is more than just an information source, StableLM is also able to write poetry, "
    "short stories, and make jokes.\n"
    "- StableLM will refuse to participate in anything that could harm a human."
)
MISTRAL_SYS = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
    "and positivity."
)

GOLDEN = {
    "LM": f"{U1}{A1}{U2}",
    "llama-2": (
        f"<s>[INST] <<SYS>>\n{LLAMA_SYS}\n<</SYS>>\n\n{U1} [/INST] {A1} </s><s>[INST] {U2} [/INST]"
    ),
    "llama-3": (
        f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA_SYS}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U1}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{U2}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral_default": f"[INST] {MISTRAL_SYS}\n\n{U1} [/INST] {A1}</s>[INST] {U2} [/INST]",
    "redpajama_chat": f"<human>: {U1}\n<bot>: {A1}\n<human>: {U2}\n<bot>:",
    "chatml": (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The "
        "assistant gives helpful and honest answers.<|im_end|>\n"
        f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "phi-2": f"Instruct: {U1}\nOutput: {A1}\nInstruct: {U2}\nOutput:",
    "vicuna_v1.1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        f"USER: {U1} ASSISTANT: {A1}</s>USER: {U2} ASSISTANT:"
    ),
    "gemma_instruction": (
        f"<start_of_turn>user\n{U1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
        f"<start_of_turn>user\n{U2}<end_of_turn>\n<start_of_turn>model\n"
    ),
    "qwen2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
        f"<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "codellama_instruct": f"<s>[INST] {U1} [/INST] {A1} </s><s>[INST] {U2} [/INST]",
    "codellama_completion": f"{U1}{A1}{U2}",
    "gpt2": f"{U1}{A1}{U2}",
    "stablelm": f"<|SYSTEM|>{STABLELM_SYS}<|USER|>{U1}<|ASSISTANT|>{A1}<|USER|>{U2}<|ASSISTANT|>",
    "stablelm-3b": (
        f"<|user|>\n{U1}<|endoftext|>\n<|assistant|>\n{A1}<|endoftext|>\n"
        f"<|user|>\n{U2}<|endoftext|>\n<|assistant|>\n"
    ),
    "tinyllama_v1_0": (
        f"<|system|>\nYou are a helpful chatbot.</s>\n<|user|>\n{U1}</s>\n<|assistant|>\n{A1}</s>\n"
        f"<|user|>\n{U2}</s>\n<|assistant|>\n"
    ),
    "dolly": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{U1}\n\n### Response:\n{A1}\n\n### End\n\n"
        f"### Instruction:\n{U2}\n\n### Response:\n"
    ),
    "oasst": (
        f"<|prompter|>{U1}<|endoftext|><|assistant|>{A1}<|endoftext|>"
        f"<|prompter|>{U2}<|endoftext|><|assistant|>"
    ),
}

REQUIRED = (
    "LM",
    "llama-2",
    "llama-3",
    "mistral_default",
    "redpajama_chat",
    "chatml",
    "phi-2",
    "vicuna_v1.1",
    "gemma_instruction",
    "qwen2",
    "codellama_instruct",
    "codellama_completion",
    "gpt2",
    "stablelm",
    "dolly",
    "oasst",
)


def test_every_required_template_exists_and_has_a_golden():
    assert set(REQUIRED) <= set(TEMPLATES)
    assert set(GOLDEN) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_two_turn_golden(name: str):
    assert render_prompt(get_template(name), CONVERSATION) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_json_round_trip_and_contract_fields(name: str):
    template = get_template(name)
    data = json.loads(json.dumps(template.to_json()))
    assert list(data) == [
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
    ]
    assert ConvTemplate.from_json(data) == template
    assert "{system_message}" in data["system_template"]
    assert set(data["roles"]) == {"user", "assistant"} and len(data["seps"]) in (1, 2)
    assert data["stop_str"] or data["stop_token_ids"]


def test_llama2_without_system_message_has_no_sys_block():
    template = get_template("llama-2").with_system_message("")
    assert render_prompt(template, CONVERSATION) == (
        f"<s>[INST] {U1} [/INST] {A1} </s><s>[INST] {U2} [/INST]"
    )


def test_leading_system_message_replaces_the_default():
    text = render_prompt(
        get_template("qwen2"), [("system", "Be terse."), *CONVERSATION[:1], ("assistant", None)]
    )
    assert text == (
        f"<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_complete_conversation_ends_with_the_assistant_separator():
    text = render_prompt(get_template("vicuna_v1.1").with_system_message(""), CONVERSATION[:2])
    assert text == f"USER: {U1} ASSISTANT: {A1}</s>"


def test_role_templates_wrap_the_content():
    data = get_template("phi-2").to_json()
    data["role_templates"] = {"user": "<<{user_message}>>"}
    text = render_prompt(ConvTemplate.from_json(data), CONVERSATION)
    assert text == f"Instruct: <<{U1}>>\nOutput: {A1}\nInstruct: <<{U2}>>\nOutput:"


def _meta_llama2_ids(sp, system: str, turns: list[tuple[str, str | None]]) -> list[int]:
    """Token ids exactly as Meta's llama `chat_completion` builds them (sentencepiece encode)."""
    first_user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{turns[0][0]}"
    turns = [(first_user, turns[0][1])] + turns[1:]
    ids: list[int] = []
    for user, answer in turns:
        if answer is None:
            ids += [sp.bos_id()] + sp.encode(f"[INST] {user.strip()} [/INST]")
        else:
            ids += [sp.bos_id()] + sp.encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ")
            ids += [sp.eos_id()]
    return ids


def test_llama2_tokens_equal_metas_reference_code():
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(
        model_file=str(TOKENIZERS / "llama2-sentencepiece" / "tokenizer.model")
    )
    tok = Tokenizer.from_file(str(TOKENIZERS / "llama2" / "tokenizer.json"))
    template = get_template("llama-2")
    text = render_prompt(template, CONVERSATION)
    ids = list(template.system_prefix_token_ids) + tok.encode(text, add_special_tokens=False).ids
    assert ids == _meta_llama2_ids(sp, LLAMA_SYS, [(U1, A1), (U2, None)])


def _load_tokenizer(folder: str) -> Tokenizer:
    path = TOKENIZERS / folder / "tokenizer.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    return Tokenizer.from_str(gzip.open(f"{path}.gz").read().decode())


def _render_jinja(folder: str, messages: list[dict]) -> str:
    """The tokenizer_config.json chat template, rendered the way transformers renders it."""
    pytest.importorskip("jinja2")
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config = json.loads((TOKENIZERS / folder / "tokenizer_config.json").read_text())
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def raise_exception(message):
        raise ValueError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(config["chat_template"]).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=config.get("bos_token") or "",
        eos_token=config.get("eos_token") or "",
        tools=None,
    )


@pytest.mark.parametrize(
    "template_name, folder, system",
    [
        ("llama-3", "llama3", LLAMA_SYS),
        ("qwen2", "qwen3", "You are a helpful assistant."),
        ("gemma_instruction", "gemma3", "Answer in French."),
    ],
)
def test_tokens_equal_the_shipped_jinja_chat_template(template_name, folder, system):
    template = get_template(template_name).with_system_message(system)
    messages = [{"role": "system", "content": system}] + [
        {"role": role, "content": content} for role, content in CONVERSATION if content
    ]
    reference_text = _render_jinja(folder, messages)
    tok = _load_tokenizer(folder)
    expected = tok.encode(reference_text, add_special_tokens=False).ids
    text = render_prompt(template, CONVERSATION)
    got = list(template.system_prefix_token_ids) + tok.encode(text, add_special_tokens=False).ids
    assert got == expected, (text, reference_text)


@pytest.mark.parametrize("template_name, folder", [("llama-3", "llama3"), ("qwen2", "qwen3")])
def test_stop_token_ids_are_the_stop_strings_of_the_real_tokenizer(template_name, folder):
    template = get_template(template_name)
    tok = _load_tokenizer(folder)
    assert {tok.token_to_id(s) for s in template.stop_str} <= set(template.stop_token_ids)


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(MlccError) as err:
        get_template("llama2")
    message = str(err.value)
    assert message.startswith("[conv_template] unknown conversation template 'llama2'")
    assert "llama-2" in message and "chatml" in message and "\n" not in message


@pytest.mark.parametrize(
    "change, error",
    [
        ({"system_template": "no placeholder"}, "must contain '{system_message}'"),
        ({"seps": ["a", "b", "c"]}, "seps must hold 1 or 2 strings"),
        ({"roles": {"user": "U"}}, "lack ['assistant']"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of token ids"),
        ({"stop_str": "</s>"}, "stop_str must be a list of strings"),
        ({"role_templates": {"user": "no placeholder"}}, "must name a known role"),
        ({"add_role_after_system_message": "yes"}, "must be true or false"),
        ({"colour": "red"}, "unknown keys ['colour']"),
    ],
)
def test_invalid_template_json_fails_with_one_line(change, error):
    data = {**get_template("chatml").to_json(), **change}
    with pytest.raises(MlccError) as err:
        ConvTemplate.from_json(data)
    assert error in str(err.value) and str(err.value).startswith("[conv_template] chatml:")


def test_missing_required_key_is_named():
    data = get_template("chatml").to_json()
    del data["seps"]
    with pytest.raises(MlccError, match=r"missing keys \['seps'\]"):
        ConvTemplate.from_json(data)


def test_bad_conversations_fail_clearly():
    template = get_template("chatml")
    with pytest.raises(MlccError, match="only a last assistant message may be empty"):
        render_prompt(template, [("assistant", None), ("user", "hi")])
    with pytest.raises(MlccError, match="only a last assistant message may be empty"):
        render_prompt(template, [("user", None)])
    with pytest.raises(MlccError, match="has role 'tool'"):
        render_prompt(template, [("tool", "x")])
    with pytest.raises(MlccError, match="content must be a string"):
        render_prompt(template, [("user", 3)])
