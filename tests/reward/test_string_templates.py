"""Text models whose chat templates take a message's content as a plain string (Qwen2-Instruct's, Llama-3's,
Mistral's): given content parts, the first kind failed to start (`str + list`) and the second rendered the list's
Python repr as the prompt, so every reward scored a wrong prompt without an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlaifv.reward.errors import InvalidInputError
from rlaifv.reward.models import load_processor
from rlaifv.reward.prompt import content_formats, encode_prompt
from rlaifv.testing.tiny_text import build_text_model

# The shapes of real templates, in the tiny model's ChatML specials.
CONCATENATING = (  # Qwen2-Instruct, Mistral, Zephyr: text joined with `+`
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PRINTING = (  # Llama-3, Gemma-2: `message['content'] | trim`, which prints a list as its repr
    "{% for message in messages %}{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ (message['content'] | trim)"
    " ~ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("text") / "model")


def _with_template(folder: Path, template: str, tmp_path: Path) -> object:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "chat_template.jinja").write_text(template)
    return load_processor(copy)


@pytest.mark.parametrize("template", [CONCATENATING, PRINTING], ids=["concatenating", "printing"])
def test_a_string_template_gets_the_text_as_a_string(text_model: Path, tmp_path: Path, template: str) -> None:
    processor = _with_template(text_model, template, tmp_path)
    assert content_formats(processor) == {"user": "string", "system": "string", "assistant": "string"}
    tokenizer = processor.tokenizer
    expected = "<|im_start|>user\nwhat is red<|im_end|>\n<|im_start|>assistant\n"
    asked = encode_prompt(processor, [], question="what is red")
    assert asked.input_ids.tolist() == tokenizer(expected, add_special_tokens=False)["input_ids"]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "text", "text": "red"}]},
    ]
    conversation = encode_prompt(processor, [], messages=messages)
    said = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is\nred<|im_end|>\n"
    assert tokenizer.decode(conversation.input_ids) == tokenizer.decode(
        tokenizer(said + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    )


def test_a_parts_template_is_left_as_it_is(text_model: Path) -> None:
    """Every vision template and the tiny models' ChatML read parts: nothing they render changes."""
    processor = load_processor(text_model)
    assert set(content_formats(processor).values()) == {"parts"}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is red"}]}]
    own = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = encode_prompt(processor, [], question="what is red").input_ids.tolist()
    assert ids == processor.tokenizer(own, add_special_tokens=False)["input_ids"]


def test_an_image_for_a_string_template_is_refused_naming_it(text_model: Path, tmp_path: Path) -> None:
    from rlaifv.reward.prompt import render_chat

    processor = _with_template(text_model, CONCATENATING, tmp_path)
    messages = [{"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "image"}]}]
    with pytest.raises(InvalidInputError, match="takes text only") as info:
        render_chat(processor, messages)
    assert info.value.param == "messages[0].content[1]"


# Parts for user turns, strings for the others, as Llama-3.2-Vision-Instruct's (system: `content | trim`) and
# Pixtral-hf's (`"[INST]" + system`, `content + eos_token`) templates are written.
MIXED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'user' %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% elif message['role'] == 'system' %}{{ message['content'] | trim }}"
    "{% else %}{{ message['content'] + '' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_template_taking_strings_for_some_roles_gets_strings_for_those_roles(
    text_model: Path, tmp_path: Path
) -> None:
    """A system message was rendered as its Python repr (Llama-3.2-Vision: 62 prompt tokens for 41), an assistant
    turn raised TypeError, a 500 (Pixtral)."""
    processor = _with_template(text_model, MIXED, tmp_path)
    assert content_formats(processor) == {"user": "parts", "system": "string", "assistant": "string"}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is red"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a colour"}]},
        {"role": "user", "content": [{"type": "text", "text": "and blue"}]},
    ]
    said = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is red<|im_end|>\n"
        "<|im_start|>assistant\na colour<|im_end|>\n<|im_start|>user\nand blue<|im_end|>\n<|im_start|>assistant\n"
    )
    tokenizer = processor.tokenizer
    ids = encode_prompt(processor, [], messages=messages).input_ids.tolist()
    assert tokenizer.decode(ids) == tokenizer.decode(tokenizer(said, add_special_tokens=False)["input_ids"])


def test_a_template_raising_type_error_on_a_message_is_a_400(text_model: Path, tmp_path: Path) -> None:
    from rlaifv.reward.prompt import render_chat

    template = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"  # fails whatever the content
    processor = _with_template(text_model, template, tmp_path)
    with pytest.raises(InvalidInputError, match="cannot render these messages: TypeError") as info:
        render_chat(processor, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert info.value.param == "messages"
