"""diffjax.tokenizer against transformers' PreTrainedTokenizerFast (the oracle) on a small BPE tokenizer folder."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from diffjax.config import Config
from diffjax.tokenizer import (
    GEMMA4_CHAT_TEMPLATE,
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    answer_ids,
    chat,
    left_pad,
    strip_thinking,
)

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]

# Shaped like the released Gemma 4 26B/31B templates (not our fallback): a system turn carrying <|think|>,
# thought channels on assistant turns, and an empty thought channel after the generation prompt when thinking
# is off. Jinja features transformers' sandbox provides (namespace, loop controls, raise_exception) are used
# on purpose.
CHECKPOINT_TEMPLATE = """\
{{- bos_token -}}
{%- set ns = namespace(first=true) -%}
{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] == 'system' -%}
{{- '<|turn>system\\n' -}}
{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] | trim -}}{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{%- continue -%}{%- endif -%}
{%- if message['role'] not in ['user', 'assistant'] -%}{{- raise_exception('bad role ' + message['role']) -}}{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<|turn>' + role + '\\n' -}}
{%- if role == 'model' and message['reasoning_content'] is defined -%}
{{- '<|channel>thought\\n' + message['reasoning_content'] + '<channel|>' -}}
{%- endif -%}
{%- if message['content'] is string -%}{{- message['content'] | trim -}}
{%- else -%}{%- for part in message['content'] -%}{{- part['text'] | trim -}}{%- endfor -%}{%- endif -%}
{{- '<turn|>\\n' -}}
{%- set ns.first = false -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\\n' -}}
{%- if not (enable_thinking is defined and enable_thinking) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world"}],
    [{"role": "user", "content": "  Why is the sky blue?  "}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello world, how are you?"},
        {"role": "assistant", "content": "Fine.", "reasoning_content": "The user greets me."},
        {"role": "user", "content": [{"type": "text", "text": "Why blue?"}]},
    ],
    [
        {"role": "user", "content": "Say <|turn> please", "name": None},
        {"role": "assistant", "content": "ok", "thinking": "aliased reasoning"},
        {"role": "user", "content": "ünïcödé ✓ 日本"},
    ],
]


def make_tokenizer_dir(path: pathlib.Path, template: str | None = CHECKPOINT_TEMPLATE, *,
                       template_in_config: bool = False) -> pathlib.Path:
    """A byte-level BPE tokenizer.json with Gemma 4's control tokens, a tokenizer_config.json, a chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["Hello world, how are you?", "The sky is blue because of Rayleigh scattering.",
              "user model system thought", "Be brief. Say please."] * 20
    backend.train_from_iterator(corpus, trainer)
    # Like Gemma's tokenizer.json: encode(text) with special tokens prepends <bos>.
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIALS.index("<bos>"))]
    )
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None and template_in_config:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if template is not None and not template_in_config:
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def oracle(path: pathlib.Path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok_dir, index, add_generation_prompt):
    hf, ours = oracle(tok_dir), Tokenizer.from_dir(tok_dir)
    messages = CONVERSATIONS[index]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.chat_ids(messages, add_generation_prompt=add_generation_prompt) == list(expected_ids)


def test_template_kwargs_reach_the_template(tok_dir):
    hf, ours = oracle(tok_dir), Tokenizer.from_dir(tok_dir)
    messages = CONVERSATIONS[0]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    rendered = ours.apply_chat_template(messages, enable_thinking=True)
    assert rendered == expected
    assert rendered == "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nHello world<turn|>\n<|turn>model\n"


def test_rendered_shape(tok_dir):
    ours = Tokenizer.from_dir(tok_dir)
    assert not ours.uses_fallback_template
    text = ours.apply_chat_template(CONVERSATIONS[2])
    assert text == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHello world, how are you?<turn|>\n"
        "<|turn>model\n<|channel>thought\nThe user greets me.<channel|>Fine.<turn|>\n"
        "<|turn>user\nWhy blue?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    ids = ours.chat_ids(CONVERSATIONS[2])
    assert ids[:2] == [ours.token_to_id("<bos>"), ours.token_to_id("<|turn>")]
    assert ids.count(ours.token_to_id("<bos>")) == 1  # the template's bos only: none added on top


def test_template_errors_surface(tok_dir):
    import jinja2

    ours = Tokenizer.from_dir(tok_dir)
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])


def test_template_from_tokenizer_config(tmp_path):
    path = make_tokenizer_dir(tmp_path / "cfg", template_in_config=True)
    hf, ours = oracle(path), Tokenizer.from_dir(path)
    messages = CONVERSATIONS[2]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_jinja_file_wins_over_config(tmp_path):
    path = make_tokenizer_dir(tmp_path / "both", template_in_config=True)
    (path / "chat_template.jinja").write_text("{{ bos_token }}FILE", encoding="utf-8")
    hf, ours = oracle(path), Tokenizer.from_dir(path)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == "<bos>FILE"
    assert hf.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "<bos>FILE"


def test_fallback_template(tmp_path):
    path = make_tokenizer_dir(tmp_path / "none", template=None)
    ours = Tokenizer.from_dir(path)
    assert ours.uses_fallback_template
    assert ours.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    # The fallback renders in transformers exactly as in ours.
    hf = oracle(path)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(
            messages, chat_template=GEMMA4_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
        )
        assert ours.apply_chat_template(messages) == expected


def test_fallback_names_bos_when_config_does_not(tmp_path):
    path = make_tokenizer_dir(tmp_path / "nocfg", template=None)
    (path / "tokenizer_config.json").unlink()
    ours = Tokenizer.from_dir(path)
    assert ours.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith("<bos><|turn>user\n")


def test_special_tokens_map_legacy(tmp_path):
    path = make_tokenizer_dir(tmp_path / "legacy")
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<unk>"}), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<bos>", "lstrip": False}, "eos_token": "<eos>"}), encoding="utf-8"
    )
    hf, ours = oracle(path), Tokenizer.from_dir(path)
    assert ours.special_tokens["bos_token"] == "<bos>"
    assert ours.bos_token_id == SPECIALS.index("<bos>") and ours.eos_token_id == SPECIALS.index("<eos>")
    assert ours.apply_chat_template(CONVERSATIONS[0]) == hf.apply_chat_template(
        CONVERSATIONS[0], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("text", ["Hello world", "  spaces  and\nnewlines\t", "ünïcödé ✓ 日本", "<|turn>user\nhi<turn|>", ""])
def test_encode_decode_round_trip(tok_dir, text):
    hf, ours = oracle(tok_dir), Tokenizer.from_dir(tok_dir)
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ids[0] == ours.bos_token_id
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    expected = hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == expected
    assert ours.decode(np.asarray(ids), skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    if "<" not in text:
        assert ours.decode(ids) == text


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)
    path = make_tokenizer_dir(tmp_path / "badcfg")
    (path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not an object"):
        Tokenizer.from_dir(path)


# ----------------------------------------------------------------------------------- byte tokenizer


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "héllo <|turn>wörld ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id == 2
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.token_to_id("<|turn>") in ids
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "héllo wörld ✓"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert tok.encode("ab", add_special_tokens=False) == [ord("a") + tok.OFFSET, ord("b") + tok.OFFSET]
    assert tok.decode([tok.vocab_size + 5, 300, 1]) == ""  # out-of-range and special ids vanish
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"
    ids = tok.chat_ids([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [2, tok.token_to_id("<|turn>")] and ids[-1] == tok.encode("\n", False)[0]
    assert tok.decode(ids, skip_special_tokens=False) == rendered


def test_helpers():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError):
        left_pad([[1], []], 0)
    tok = ByteTokenizer()
    o, c = tok.token_to_id("<|channel>"), tok.token_to_id("<channel|>")
    assert strip_thinking([20, o, 21, 22, c, 23], tok) == [20, 23]
    assert answer_ids([20, 0, 21, 1, 22], eos_ids=(1,), pad_id=0) == [20, 21]


# ------------------------------------------------------------------------------------------- chat()


@pytest.fixture(scope="module")
def tiny_model():
    config = Config.tiny(max_position_embeddings=4096)
    return config, jax.jit(lambda key: __import__("diffjax").init_params(config, key))(jax.random.key(0))


def test_chat_end_to_end(tok_dir, tiny_model):
    config, params = tiny_model
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.vocab_size <= config.vocab_size
    kwargs = dict(key=jax.random.key(1), max_new_tokens=16, max_denoising_steps=2)
    answer = chat(params, config, tok, [{"role": "user", "content": "Hello world"}], **kwargs)
    assert isinstance(answer, str)
    # Same key, same conversation: the same answer (generation is deterministic given the key).
    assert chat(params, config, tok, [{"role": "user", "content": "Hello world"}], **kwargs) == answer
    answers = chat(params, config, tok, [CONVERSATIONS[0], CONVERSATIONS[2]], **kwargs)
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_chat_byte_tokenizer_on_steps(tiny_model):
    config, params = tiny_model
    steps = []
    answer = chat(params, config, ByteTokenizer(), [{"role": "user", "content": "Hi"}], key=jax.random.key(2),
                  max_new_tokens=16, max_denoising_steps=2, eos_token_id=None,
                  on_step=lambda i, n, draft: steps.append((int(i), int(n), np.asarray(draft).shape)))
    assert isinstance(answer, str)
    assert steps == [(0, 2, (1, config.canvas_length)), (0, 1, (1, config.canvas_length))]


def test_chat_answer_is_the_generated_tokens_decoded(tiny_model):
    """chat() against generate() on the same rendered prompt and key: the answer is the new tokens only (none
    of the prompt's), decoded."""
    from diffjax.generate import generate

    config, params = tiny_model
    tok = ByteTokenizer()
    conversation = [{"role": "user", "content": "Hi"}]
    kwargs = dict(max_new_tokens=16, max_denoising_steps=2, eos_token_id=None)
    answer = chat(params, config, tok, conversation, key=jax.random.key(3), **kwargs)
    ids = tok.chat_ids(conversation)
    out = generate(params, config, np.asarray([ids]), key=jax.random.key(3), pad_token_id=config.pad_token_id,
                   **kwargs)
    expected = tok.decode(np.asarray(out.sequences)[0, len(ids):])
    assert len(expected) > 4  # enough of the random model's ids fall in the byte range to compare on
    assert answer == expected
