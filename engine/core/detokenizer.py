"""Incremental detokenization: turn each new token into the text it adds, without re-decoding
the whole output every step and without splitting multi-byte characters."""
from __future__ import annotations


class IncrementalDetokenizer:
    # Decoding a window of a few tokens before the new ones lets byte-level BPE merge
    # correctly at the boundary (spaces, multi-token characters).
    CONTEXT = 6

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text ('' while a character is partial)."""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            # Keep the window short so each step decodes a bounded number of tokens.
            if self.prefix_offset > self.CONTEXT:
                cut = self.prefix_offset - self.CONTEXT
                self.ids = self.ids[cut:]
                self.prefix_offset -= cut
                self.read_offset -= cut
            return new
        return ""
