"""The model's own chat format: conversations to token ids, its stop ids and its padding id.

Every stage that turns text into token ids (SFT, the reward model, PPO's prompts, evaluation) goes through
one :class:`ChatFormat` built from the run's tokenizer, so a model is trained and sampled in the format it
was (or will be) used in (docs/ppo_details.md item 28; docs/design.md, "Bring your own model and data"):

- **prompt** = the tokenizer's chat template applied to the conversation so far with
  ``add_generation_prompt=True`` (BOS only where the template writes one);
- **reply** = the ids of the whole rendered conversation after the prompt's ids, up to and including the
  template's end-of-turn token (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, the world's ``</s>``). The
  reply is cut out of the whole conversation rather than encoded alone, so prompt + reply is token for
  token what the model sees when the conversation is rendered at once; a template whose full rendering
  does not extend its own generation prompt is refused (:class:`ChatError`).
- **stop ids** = the end-of-turn token, the tokenizer's EOS and every ``eos_token_id`` in the model
  directory's ``generation_config.json`` / ``config.json``: vLLM stops on them, the PPO driver cuts after
  the first of them, and ``rollout/eos_rate`` and evaluation count them.

Pretraining text has no conversation: :meth:`ChatFormat.text_ids` is ``BOS (if the tokenizer has one) +
text + EOS``, as before.

Messages are ``{"role": "system" | "user" | "assistant", "content": str}`` dicts (the records of
:mod:`trainers.data` are normalised to them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainers.errors import ConfigError, DataError

PROBE_USER = "Probe question?"
PROBE_REPLY = "Probe answer."
"""The conversation rendered once to find the end-of-turn token (any plain text would do)."""


class ChatError(ValueError):
    """A conversation (or the template itself) cannot be rendered into prompt and reply ids; ``str(err)``
    says why, without a file or record (the caller adds those)."""


def user_turn(prompt: str) -> list[dict]:
    """A one-turn conversation from a plain prompt string."""
    return [{"role": "user", "content": prompt}]


def as_messages(prompt: str | Sequence[dict]) -> list[dict]:
    """A prompt as a conversation: a string is one user turn, a message list stays as it is."""
    return user_turn(prompt) if isinstance(prompt, str) else list(prompt)


def prompt_of(record: dict) -> str | list[dict]:
    """The prompt of a canonical prompts record (:func:`trainers.data.read_conversations`): its text when the
    conversation is one user turn (what judges such as the world's gold labeler read), else its messages."""
    messages = record["messages"]
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def eos_ids_of(model_dir: str | Path) -> tuple[int, ...]:
    """The ``eos_token_id`` ids of a model directory: ``generation_config.json`` and ``config.json``
    together (each may hold an int, a list or nothing), sorted, no repeats; ``()`` when neither lists one.

    A file that is not JSON, or an ``eos_token_id`` that is not an int or a list of ints, is a
    :class:`ConfigError` naming the file.
    """
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not readable JSON ({err})") from None
        eos = raw.get("eos_token_id") if isinstance(raw, dict) else None
        if eos is None:
            continue
        listed = [eos] if isinstance(eos, int) else eos
        if not isinstance(listed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in listed
        ):
            raise ConfigError(f"{path}: eos_token_id must be an int or a list of ints, got {eos!r}")
        ids.update(listed)
    return tuple(sorted(ids))


def _special_ids(tok) -> set[int]:
    """Ids of every special token the tokenizer knows (named specials and added special tokens)."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, added in tok.added_tokens_decoder.items() if added.special)
    return ids


@dataclass(frozen=True)
class ChatFormat:
    """Conversations to token ids in one tokenizer's chat template (see the module docstring)."""

    tokenizer: object
    end_of_turn_id: int
    """The special token the template writes right after an assistant's text."""
    stop_ids: tuple[int, ...]
    """Sorted ids any of which ends a response."""
    pad_id: int
    """Padding id (the tokenizer's; may equal a stop id: masks come from lengths, docs/ppo_details.md item 2)."""

    @classmethod
    def from_tokenizer(cls, tok, model_dir: str | Path | None = None) -> ChatFormat:
        """The format of ``tok`` (a tokenizer from :func:`trainers.data.tokenizer.load_tokenizer`, which
        settles its PAD); ``model_dir`` adds its configs' stop ids. :class:`ChatError` if the tokenizer
        has no chat template or the template writes no special token after the assistant's text."""
        if not getattr(tok, "chat_template", None):
            raise ChatError(
                "the tokenizer has no chat template; give one with model.chat_template=FILE.jinja"
            )
        probe = cls(tok, -1, (), tok.pad_token_id)
        prompt = probe.render(user_turn(PROBE_USER), generation_prompt=True)
        full = probe.render([*user_turn(PROBE_USER), _assistant(PROBE_REPLY)], generation_prompt=False)
        at = full.find(PROBE_REPLY, len(prompt))
        if not full.startswith(prompt) or at < 0:
            raise ChatError(
                "the chat template's rendering of a conversation does not continue its generation prompt "
                "with the assistant's text"
            )
        special = _special_ids(tok)
        after = [i for i in probe.encode(full[at + len(PROBE_REPLY) :]) if i in special]
        if not after:
            raise ChatError(
                "the chat template writes no special token after the assistant's text, so a response "
                "has no end; use a template that ends each turn with one"
            )
        eot = after[0]
        stops = {eot, tok.eos_token_id, *(eos_ids_of(model_dir) if model_dir is not None else ())}
        outside = sorted(i for i in stops if not 0 <= i < len(tok))
        if outside:
            raise ChatError(
                f"eos_token_id {outside[0]} (in {model_dir}) is outside the tokenizer's vocabulary "
                f"(size {len(tok)})"
            )
        return cls(tok, eot, tuple(sorted(stops)), tok.pad_token_id)

    # ------------------------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        """The template's text of ``messages`` (:class:`ChatError` when the template refuses them)."""
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja's TemplateError / raise_exception, any template bug
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ChatError(f"the chat template cannot render this conversation ({text})") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of already-rendered text: special-token strings become their ids, nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Ids of the conversation so far followed by the generation prompt (where the reply starts)."""
        return self.encode(self.render(messages, generation_prompt=True))

    def reply_ids(self, messages: Sequence[dict], reply: str) -> tuple[list[int], list[int]]:
        """``(prompt ids, reply ids)`` of ``messages`` answered by ``reply``; the reply ends with the
        end-of-turn token and prompt + reply equals the whole rendered conversation's first ids."""
        prompt, (ids,) = self.replies_ids(messages, [reply])
        return prompt, ids

    def replies_ids(
        self, messages: Sequence[dict], replies: Sequence[str]
    ) -> tuple[list[int], list[list[int]]]:
        """``(prompt ids, [reply ids] per reply)``: :meth:`reply_ids` for several answers to one prompt (the
        RM's K responses), the prompt rendered and encoded once."""
        prompt = self.prompt_ids(messages)
        out = []
        for reply in replies:
            full = self.encode(self.render([*messages, _assistant(reply)], generation_prompt=False))
            out.append(self._reply_after(prompt, full))
        return prompt, out

    def _reply_after(self, prompt: list[int], full: list[int]) -> list[int]:
        """``full``'s ids after ``prompt``, through the first end-of-turn token."""
        if full[: len(prompt)] != prompt:
            raise ChatError(
                "the rendered conversation's tokens do not start with its prompt's tokens (the template "
                "or tokenizer renders the prompt differently once a reply follows)"
            )
        rest = full[len(prompt) :]
        if self.end_of_turn_id not in rest:
            raise ChatError("the rendered reply has no end-of-turn token")
        return rest[: rest.index(self.end_of_turn_id) + 1]

    def conversation_ids(
        self, messages: Sequence[dict], all_turns: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, target spans)`` of a conversation ending with an assistant turn, for SFT.

        The ids are the whole conversation through its final end-of-turn token. Spans are half-open
        ``(start, end)`` ranges of reply tokens to train on: the final assistant turn only, or with
        ``all_turns`` every assistant turn (each reply cut out of the rendering of the conversation up to
        that turn, which must be a prefix of the whole).
        """
        if not messages or messages[-1].get("role") != "assistant":
            raise ChatError("the conversation does not end with an assistant turn")
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not all_turns:
            turns = turns[-1:]
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for i in turns:
            prompt, reply = self.reply_ids(messages[:i], messages[i]["content"])
            if prompt[: len(ids)] != ids:
                raise ChatError(
                    f"assistant turn {i + 1}: the template renders the earlier turns differently once "
                    "the conversation goes on; train on the final turn only (sft.assistant_turns=final)"
                )
            spans.append((len(prompt), len(prompt) + len(reply)))
            ids = prompt + reply
        return ids, spans

    def text_ids(self, text: str) -> list[int]:
        """Pretraining text: ``BOS + text + EOS`` (no BOS when the tokenizer has none)."""
        tok = self.tokenizer
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        return [*bos, *self.encode(text), *eos]


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def open_chat_format(tok, where: str | Path, model_dir: str | Path | None = None) -> ChatFormat:
    """:meth:`ChatFormat.from_tokenizer` with its problem as a one-line DataError naming ``where`` (the
    tokenizer directory): what a tokenizer lacks is found on the driver, before any worker starts."""
    try:
        return ChatFormat.from_tokenizer(tok, model_dir)
    except ChatError as err:
        raise DataError(f"{where}: {err}") from None
