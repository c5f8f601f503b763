"""A continuation of an assistant prefill, as text and as tokens, for the two ways tokenizers mark word starts:
byte-level BPE (GPT-2, Qwen: the space is part of the next token) and SentencePiece-style metaspace (Llama,
Gemma: "▁" starts a word and a decoder drops it at the start of a decode). Both tokenizers are trained here."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlaifv.reward.prompt import continuation_ids, decoded_after, stop_cut_ids, tidy_answer

CORPUS = ["The image shows a red square and a blue circle.", "a red circle, two blue squares", "The answer is yes"] * 20


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte-level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
@pytest.mark.parametrize("text", [" red square", " red square, a blue circle.", ", two blue squares", "s and a"])
def test_a_continuation_reads_and_tokenizes_as_it_follows_the_prefill(kind: str, text: str) -> None:
    tok = _tokenizer(kind)
    context = tok("The image shows a", add_special_tokens=False)["input_ids"][-4:]
    ids = continuation_ids(tok, text, context)
    head = tok.decode(context)
    assert tok.decode([*context, *ids]) == head + text  # scored tokens spell prefill + the text the client gets
    assert decoded_after(tok, ids, context) == text  # and that text is what decoding the tokens behind it gives
    if kind == "metaspace" and text.startswith(" "):
        assert tok.decode(ids) == text.lstrip()  # what decoding alone would have lost


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_without_context_an_answer_tokenizes_alone(kind: str) -> None:
    tok = _tokenizer(kind)
    assert continuation_ids(tok, "a red square") == tok("a red square", add_special_tokens=False)["input_ids"]
    assert decoded_after(tok, continuation_ids(tok, "a red square")) == "a red square"


def test_stop_strings_are_found_in_a_continuation_as_it_reads_after_the_prefill() -> None:
    """A stop string with a leading space at the very start of a continuation stops sampling at once (the sampler
    reads the continuation after the prompt's last tokens, as the client does)."""
    from PIL import Image

    from rlaifv.reward.bundle import load_bundle
    from rlaifv.reward.model_pair import GenerateTask
    from rlaifv.reward.sampling import SamplingParams
    from rlaifv.service.default_model import default_bundle

    pair = load_bundle(default_bundle())  # the shipped shapes-world pair: a tokenizer with "▁" word starts
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": "The image shows a"},
    ]
    prompt = pair.encode([Image.new("RGB", (64, 64), (200, 30, 30))], messages=messages, continue_final=True)
    free = SamplingParams(temperature=0, max_tokens=8, logit_bias={pair.eot_id: -100.0})
    first = pair.tokenizer.convert_ids_to_tokens(pair.sample([prompt], [1], [free])[0][0].token_ids[:1])[0]
    stop = " " + first.lstrip("▁Ġ")[:2]  # how the greedy continuation begins, as the client reads it
    params = free.model_copy(update={"stop": (stop,)})
    seen: list = []
    sample = pair.sample
    pair.sample = lambda *args, **kw: seen.append(kw.get("contexts")) or sample(*args, **kw)  # type: ignore[method-assign]
    [ranking] = pair.generate_batch([GenerateTask(prompt, 1, params, pair.reward, continue_final=True)])
    del pair.sample
    assert seen == [[prompt.input_ids[-4:].tolist()]]  # best-of-N samples with the prompt's context
    [[sample]] = pair.sample([prompt], [1], [params], contexts=[prompt.input_ids[-4:].tolist()])
    assert len(sample.token_ids) == 1  # stopped at the first token, not after max_tokens
    assert ranking.candidates[0].finish_reason == "stop" and ranking.candidates[0].text == ""


def _word_level() -> PreTrainedTokenizerFast:
    """A vocabulary of whole words, as the shapes world's: a word cut in two is its unknown token."""
    words = sorted({w for line in CORPUS for w in line.replace(",", " ,").replace(".", " .").split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("context", [False, True])
def test_a_stop_cut_inside_a_word_the_vocabulary_lacks_ends_at_the_whole_word_before(context: bool) -> None:
    """'a red squ' re-tokenized to 'a red <unk>': the reward scored the unknown token, not the text given."""
    tok = _word_level()
    lead = tok("The image shows", add_special_tokens=False)["input_ids"] if context else []
    sampled = tok("a red square and", add_special_tokens=False)["input_ids"]
    cut = decoded_after(tok, sampled, lead).split(" and")[0][:-3]  # "a red squ" (as it reads after the lead)
    text, ids = stop_cut_ids(tok, cut, sampled, eot_id=1, context=lead)
    assert text.strip() == "a red" and tok.unk_token_id not in ids
    assert ids == [*continuation_ids(tok, text, lead), 1]
    whole = tidy_answer(decoded_after(tok, sampled[:3], lead), lead)  # a cut at a word's end is kept as it is
    assert stop_cut_ids(tok, whole, sampled, eot_id=1, context=lead)[0] == whole


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_a_stop_cut_inside_a_word_a_subword_vocabulary_spells_is_kept(kind: str) -> None:
    tok = _tokenizer(kind)
    sampled = tok("a red square", add_special_tokens=False)["input_ids"]
    text, ids = stop_cut_ids(tok, "a red squ", sampled, eot_id=1)
    assert text == "a red squ" and ids == [*continuation_ids(tok, "a red squ"), 1]
