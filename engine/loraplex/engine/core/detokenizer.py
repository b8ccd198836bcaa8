"""Incremental detokenization: the text each new token adds, decoded in Rust by tokenizers'
`DecodeStream` (no re-decoding of the whole output, no multi-byte character split in two)."""
from __future__ import annotations

from collections import deque

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    # The last prompt tokens go in first, so that the boundary decodes as prompt + output would
    # (a leading space, byte pieces). A few are enough: decoding merges only nearby tokens.
    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-self.CONTEXT:])
        self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self.done: deque[int] = deque(context, maxlen=self.CONTEXT)  # the last tokens whose text is out
        self.pending: list[int] = []  # tokens of a character not complete yet

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is partial)."""
        text = self.stream.step(self.tokenizer, token_id)
        if text is None:
            self.pending.append(token_id)
            return ""
        self.done.extend(self.pending)
        self.done.append(token_id)
        self.pending.clear()
        return text

    def flush(self) -> str:
        """At the end of a sequence, the text of the tokens held back as a partial character,
        rendered as a full decode renders it (U+FFFD for bytes that never completed)."""
        if not self.pending:
            return ""
        pending, self.pending = self.pending, []
        head = self._decode(list(self.done))
        full = self._decode([*self.done, *pending])
        self.done.extend(pending)
        return full[len(head):] if full.startswith(head) else self._decode(pending)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
