"""Incremental text from generated ids, holding back incomplete UTF-8 characters.

Byte-level BPE tokens can end in the middle of a multi-byte character, which decodes to U+FFFD ("\\ufffd").
As upstream `llm_generate_chunk` does, each push emits the longest prefix of the pending ids whose text does
not end in U+FFFD and keeps the rest for the next push; `finish` flushes what is left. Replacement characters
in the middle of a piece (a byte sequence that never completes) are emitted as they are, like upstream.

Token id 0: upstream's `_decode_text` drops every id 0 before decoding because it treats 0 as padding
(`pad_token_id=0`), but in Qwen2's byte-level vocabulary id 0 is "!", so upstream silently deletes standalone
exclamation marks from answers ("Hello!" -> "Hello"). We deliberately do NOT reproduce this: the generated ids
are identical either way, and our text keeps the "!" the model produced. Stop ids are dropped by the caller's
choice (`drop_ids`, normally `<|im_end|>` and `<|endoftext|>`, which upstream strips as terminators).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from transformers import PreTrainedTokenizerFast

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, drop_ids: Collection[int] = ()):
        self.tokenizer = tokenizer
        self.drop_ids = frozenset(drop_ids)
        self.pending: list[int] = []
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, ids: Iterable[int]) -> str:
        """Add generated ids; return the text that became complete (may be "")."""
        self.pending += [i for i in ids if i not in self.drop_ids]
        end = len(self.pending)
        piece = self._decode(self.pending) if end else ""
        while end and piece.endswith(REPLACEMENT_CHAR):
            end -= 1
            piece = self._decode(self.pending[:end]) if end else ""
        self.pending = self.pending[end:]
        self.text += piece
        return piece

    def finish(self) -> str:
        """The held-back rest at the end of generation (incomplete characters decode to U+FFFD)."""
        piece = self._decode(self.pending) if self.pending else ""
        self.pending = []
        self.text += piece
        return piece
