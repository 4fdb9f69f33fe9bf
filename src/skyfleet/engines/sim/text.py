"""Tokens and text for the simulator: a cheap tokenizer stand-in and deterministic completions.

Tokenizer approximation
    One token is :data:`CHARS_PER_TOKEN` (4) characters: ``count_tokens(s) == ceil(len(s) / 4)``.
    Prefix-cache blocks are therefore runs of ``4 * block_tokens`` characters, and block ``i``
    covers exactly tokens ``[i * block_tokens, (i + 1) * block_tokens)``.

Chat template
    ``messages`` render as ``<|role|>\\ncontent\\n`` each, followed by ``<|assistant|>\\n``.
    A conversation that resends the previous answer therefore has ``previous prompt + answer``
    as a prefix, and hits the prefix cache the way a real multi-turn chat does.

Completions
    The vocabulary has 256 tokens of exactly 4 characters (a space and three letters), so a
    completion of ``n`` tokens is ``4 * n`` characters and re-counts as ``n`` tokens. Token ids
    are the bytes of a keyed BLAKE2b stream over ``(seed, prompt)``: the same prompt and seed
    always give the same text, across processes and machines. The *natural* length (where
    the "model" would emit EOS) comes from the same hash, so ``max_tokens`` only truncates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

CHARS_PER_TOKEN = 4

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"

#: 256 tokens of four characters each: " " + consonant + vowel + consonant (every third such word).
VOCAB: tuple[str, ...] = tuple(f" {a}{v}{b}" for a in _CONSONANTS for v in _VOWELS for b in _CONSONANTS)[::3]
VOCAB = VOCAB[:256]

_MASK64 = (1 << 64) - 1


class PromptError(ValueError):
    """A prompt or ``messages`` value that cannot be rendered; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def count_tokens(text: str) -> int:
    """Approximate token count: one token per :data:`CHARS_PER_TOKEN` characters, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def block_hashes(text: str, block_tokens: int, cache_salt: str | None = None) -> list[bytes]:
    """Chained hashes of the full blocks of ``text``: hash ``i`` identifies the prefix up to block ``i``.

    A ``cache_salt`` goes into the first block's hash (and through the chain into every later one),
    as in vLLM: prompts with different salts never share a block.
    """
    width = block_tokens * CHARS_PER_TOKEN
    full = len(text) // width
    if not full:
        return []
    hasher = hashlib.blake2b(digest_size=16)
    if cache_salt is not None:
        salt = cache_salt.encode("utf-8", "surrogatepass")
        hasher.update(b"salt" + len(salt).to_bytes(4, "big") + salt)
    out: list[bytes] = []
    for i in range(full):
        hasher.update(text[i * width : (i + 1) * width].encode("utf-8", "surrogatepass"))
        out.append(hasher.digest())
    return out


def mix_seed(base: int, request_seed: int | None) -> int:
    """Combine the replica's seed with a request's ``seed`` (``None``: the replica's own)."""
    if request_seed is None:
        return base & _MASK64
    return (base ^ (request_seed * 0x9E3779B97F4A7C15)) & _MASK64


def generate(
    prompt: str, seed: int, natural_max: int, max_tokens: int, ignore_eos: bool
) -> tuple[bytes, str]:
    """The completion of ``prompt``: its token ids (bytes, each an index in :data:`VOCAB`) and finish reason.

    ``finish_reason`` is ``"stop"`` when the natural length fits in ``max_tokens``, else
    ``"length"``; with ``ignore_eos`` exactly ``max_tokens`` tokens and ``"length"``.
    """
    key = hashlib.blake2b(
        prompt.encode("utf-8", "surrogatepass"), digest_size=64, key=(seed & _MASK64).to_bytes(8, "little")
    ).digest()
    if ignore_eos:
        n, reason = max_tokens, "length"
    else:
        natural = 1 + int.from_bytes(key[:8], "little") % natural_max
        n, reason = (natural, "stop") if natural <= max_tokens else (max_tokens, "length")
    ids = key[8 : 8 + n]
    if n > len(ids):
        parts = [ids]
        have = len(ids)
        counter = 0
        while have < n:
            block = hashlib.blake2b(counter.to_bytes(8, "little"), digest_size=64, key=key[:32]).digest()
            parts.append(block)
            have += 64
            counter += 1
        ids = b"".join(parts)[:n]
    return ids, reason


def detokenize(ids: bytes) -> str:
    return "".join([VOCAB[i] for i in ids])


def render_chat(messages: Any) -> str:
    """The prompt text of a chat ``messages`` list (see the module docstring for the template)."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("'messages' must be a non-empty array", "messages")
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PromptError(f"messages[{i}] must be an object", "messages")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError(f"messages[{i}].role must be a non-empty string", "messages")
        parts.append(f"<|{role}|>\n{_content_text(msg.get('content'), i)}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _content_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict):
                raise PromptError(f"messages[{i}].content parts must be objects", "messages")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError(f"messages[{i}].content text parts need a string 'text'", "messages")
                texts.append(text)
        return "".join(texts)
    raise PromptError(f"messages[{i}].content must be a string or an array of parts", "messages")


def render_prompt(prompt: Any) -> str:
    """The prompt text of a ``/v1/completions`` ``prompt``: a string, ``[string]``, or token ids.

    Token ids become four characters each, so they count as exactly one token apiece.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return render_prompt(prompt[0])
        if _all_ints(prompt):
            return "".join([format(t & 0xFFFF, "04x") for t in prompt])
        raise PromptError(
            "only one prompt per request is supported (a string, [string] or token ids)", "prompt"
        )
    raise PromptError("'prompt' must be a non-empty string, [string] or array of token ids", "prompt")


def _all_ints(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
