"""Text in and out: a checkpoint's `tokenizer.json` + chat template, a byte-level stand-in, and `chat()`.

    tok = Tokenizer.from_dir("path/to/checkpoint")         # tokenizer.json (+ chat_template.jinja, configs)
    ids = tok.chat_ids([{"role": "user", "content": "Hi"}])
    text = chat(params, config, tok, [{"role": "user", "content": "Hi"}], key=jax.random.key(0))

The chat template is rendered the way transformers 5.23.0 `apply_chat_template` renders it (same jinja
sandbox and options, special tokens from `tokenizer_config.json` / `special_tokens_map.json` as template
variables, the rendered string tokenized without adding special tokens): the template shipped in the
checkpoint is the authority. Only a checkpoint without any template falls back to `GEMMA4_CHAT_TEMPLATE`.

`ByteTokenizer` is NOT a real vocabulary: it exists so that random test models (tests, `chat` examples) have
something to encode with (UTF-8 bytes shifted by an offset, a few Gemma-4-like control tokens).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from diffjax.config import Config

Message = Mapping[str, Any]
Conversation = Sequence[Message]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Processors (multimodal checkpoints) sometimes keep the template here instead.
PROCESSOR_CHAT_TEMPLATE_FILE = "chat_template.json"

# The fallback for checkpoints that ship no template: Gemma 4's turn format, nothing more.
#   <bos><|turn>system\n...<turn|>\n<|turn>user\n...<turn|>\n<|turn>model\n
# An assistant message's reasoning (`reasoning_content`, or `thinking`/`reasoning`, aliased as transformers
# does) is written as `<|channel>thought\n...<channel|>` before its content; `enable_thinking=True` puts
# `<|think|>` at the start of the system turn (adding one if the conversation has none). No tools, no media.
GEMMA4_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if (enable_thinking is defined and enable_thinking) or messages[0]['role'] == 'system' -%}
    {{- '<|turn>system\\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
    {%- if messages[0]['role'] == 'system' -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\\n' -}}
    {%- if role == 'model' and message['reasoning_content'] is defined -%}
        {{- '<|channel>thought\\n' + message['reasoning_content'] | trim + '<channel|>' -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\\n' -}}
{%- endif -%}
"""

# Names a message's reasoning may come under; templates read the first (transformers aliases them the same way).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# transformers' standard special-token attributes (model-specific `*_token` keys are passed through too).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used; the message names the file."""


# ------------------------------------------------------------------------------------ chat template


def _compile_template(source: str) -> Any:
    """Compile a chat template in the sandbox transformers uses, with the same globals and filters.

    Templates come from downloaded checkpoints: they are untrusted code, hence the immutable sandbox.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps it.
        tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters, which would change prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """A copy built from plain JSON types only, so the sandboxed template never sees a caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Conversation) -> list[dict[str, Any]]:
    """As transformers does: drop None-valued keys, and alias a message's reasoning under every usual name."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _ChatTemplateMixin:
    """Chat-template rendering shared by the real and the byte-level tokenizer."""

    chat_template: str
    special_tokens: dict[str, str]
    _compiled: Any = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:  # pragma: no cover (abstract)
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def apply_chat_template(
        self, messages: Conversation, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """Render one conversation to the prompt string (extra keywords, e.g. `enable_thinking`, reach the template)."""
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        variables = {**self.special_tokens, **_plain(template_kwargs)}  # caller's keywords win, as in transformers
        return self._compiled.render(
            messages=_prepare_messages(messages), tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **variables,
        )

    def chat_ids(self, messages: Conversation, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation; the template writes `<bos>` itself, so none is added."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")


# --------------------------------------------------------------------------------------- tokenizers


class Tokenizer(_ChatTemplateMixin):
    """A `tokenizers.Tokenizer` (a checkpoint's `tokenizer.json`) plus its chat template and special tokens."""

    def __init__(
        self, backend: Any, chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.uses_fallback_template = chat_template is None
        if chat_template is None:
            chat_template = GEMMA4_CHAT_TEMPLATE
            # The fallback writes `{{ bos_token }}`: name Gemma's if the folder did not.
            if "bos_token" not in self.special_tokens and backend.token_to_id("<bos>") is not None:
                self.special_tokens["bos_token"] = "<bos>"
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `path/tokenizer.json` with the folder's chat template and special tokens.

        Template priority (as transformers): `chat_template.jinja`, then `tokenizer_config.json`'s
        `chat_template` (a string, or a list of named templates: "default"), then `chat_template.json`;
        none of them -> `GEMMA4_CHAT_TEMPLATE`.
        """
        from tokenizers import Tokenizer as Backend

        folder = pathlib.Path(path)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(f"no {TOKENIZER_FILE} in {folder}")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{file}: cannot load ({exc})") from None
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        special = _special_tokens(config)
        if "added_tokens_decoder" not in config:
            # Legacy folders keep the special tokens in their own file, which then wins (transformers' order).
            special.update(_special_tokens(_read_json(folder / SPECIAL_TOKENS_MAP_FILE)))
        return cls(backend, _find_chat_template(folder, config), special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the file's post-processor (Gemma: a leading <bos>)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (control tokens left out unless `skip_special_tokens=False`)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


class ByteTokenizer(_ChatTemplateMixin):
    """STAND-IN tokenizer for random test models: UTF-8 bytes, id = byte + `OFFSET`.

    Not a trained vocabulary and not compatible with any real checkpoint. Ids below `OFFSET` are control
    tokens (pad 0, eos 1, bos 2, unk 3 as in Gemma, then Gemma 4's turn/channel markers) so that the
    fallback Gemma 4 chat template renders to meaningful ids. Ids at or above `OFFSET + 256` decode to nothing.
    """

    SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>")
    OFFSET = 16
    vocab_size = OFFSET + 256

    def __init__(self) -> None:
        self._special_ids = {token: i for i, token in enumerate(self.SPECIALS)}
        self._special_re = re.compile("|".join(re.escape(t) for t in self.SPECIALS))
        self.special_tokens = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
        self.chat_template = GEMMA4_CHAT_TEMPLATE
        self.uses_fallback_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Control-token strings map to their ids (like added tokens); everything else to its UTF-8 bytes."""
        ids = [self._special_ids["<bos>"]] if add_special_tokens else []
        position = 0
        for match in self._special_re.finditer(text):
            ids += [b + self.OFFSET for b in text[position:match.start()].encode("utf-8")]
            ids.append(self._special_ids[match.group()])
            position = match.end()
        ids += [b + self.OFFSET for b in text[position:].encode("utf-8")]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        run = bytearray()
        for i in (int(i) for i in ids):
            if self.OFFSET <= i < self.OFFSET + 256:
                run.append(i - self.OFFSET)
                continue
            if i < self.OFFSET and not skip_special_tokens and i < len(self.SPECIALS):
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                pieces.append(self.SPECIALS[i])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        return self._special_ids.get(token)


AnyTokenizer = Tokenizer | ByteTokenizer


def _read_json(file: pathlib.Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{file}: bad JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: bad JSON (not an object)")
    return data


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """`*_token` entries (strings or serialised AddedTokens) -> their strings; these are template variables."""
    out = {}
    for key, value in config.items():
        if not key.endswith("_token") and key not in _SPECIAL_TOKEN_NAMES:
            continue
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _find_chat_template(folder: pathlib.Path, config: Mapping[str, Any]) -> str | None:
    file = folder / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    processor = _read_json(folder / PROCESSOR_CHAT_TEMPLATE_FILE).get("chat_template")
    return processor if isinstance(processor, str) else None


# --------------------------------------------------------------------------------------------- chat


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> (ids [batch, width], attention_mask [batch, width]), padded on the LEFT to `width` (None:
    the longest row's length; a longer row is an error).

    Left padding keeps every prompt's last token next to the canvas, the position the decoder continues from.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(r) for r in rows)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a prompt of {longest} tokens does not fit the padded width {width}")
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = True
    return ids, mask


def strip_thinking(ids: Sequence[int], tokenizer: AnyTokenizer) -> list[int]:
    """Drop `<|channel>...<channel|>` spans (the model's thought channel) from generated ids."""
    open_id, close_id = tokenizer.token_to_id(THOUGHT_OPEN), tokenizer.token_to_id(THOUGHT_CLOSE)
    if open_id is None or close_id is None:
        return list(ids)
    out: list[int] = []
    inside = False
    for i in ids:
        if i == open_id:
            inside = True
        elif i == close_id and inside:
            inside = False
        elif not inside:
            out.append(int(i))
    return out


def answer_ids(new_tokens: Sequence[int], eos_ids: Sequence[int], pad_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS, pads removed."""
    out = []
    for token in (int(t) for t in new_tokens):
        if token in eos_ids:
            break
        if token != pad_id:
            out.append(token)
    return out


def chat(
    params: Any,
    config: Config,
    tokenizer: AnyTokenizer,
    messages: Conversation | Sequence[Conversation],
    *,
    key: jax.Array,
    keep_thinking: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> str | list[str]:
    """Answer one conversation (-> str) or a list of conversations (-> list[str], one batched `generate`).

    Prompts are rendered with the tokenizer's chat template (generation prompt added) and left-padded with
    an attention mask. EOS and pad default to the model config's (`config.eos_token_id`, `pad_token_id`);
    any `generate` keyword (max_new_tokens, max_denoising_steps, on_step, ...) passes through. The answer is
    the text before the first EOS, special tokens skipped, the thought channel removed unless `keep_thinking`.
    """
    from diffjax.generate import generate

    batched = bool(messages) and not isinstance(messages[0], Mapping)
    conversations: Sequence[Conversation] = messages if batched else [messages]  # type: ignore[assignment]
    if not conversations:
        raise ValueError("chat() needs at least one conversation")
    rows = [tokenizer.chat_ids(c, **dict(template_kwargs or {})) for c in conversations]
    eos = generate_kwargs.setdefault("eos_token_id", tuple(config.eos_token_id))
    pad = generate_kwargs.setdefault("pad_token_id", config.pad_token_id)
    ids, mask = left_pad(rows, pad)
    out = generate(params, config, jnp.asarray(ids), key=key, attention_mask=jnp.asarray(mask), **generate_kwargs)
    eos_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    new_tokens = np.asarray(out.sequences)[:, ids.shape[1]:]
    answers = []
    for row in new_tokens:
        kept = answer_ids(row, eos_ids, pad)
        if not keep_thinking:
            kept = strip_thinking(kept, tokenizer)
        answers.append(tokenizer.decode(kept, skip_special_tokens=True))
    return answers if batched else answers[0]
