"""Token ids in, text deltas out, for one completion: never a broken UTF-8 character, never
a stop string.

Decoding tokens one at a time is wrong for two reasons: a character can span several
tokens (byte-level BPE splits an emoji into four byte tokens, each decoding to U+FFFD), and
many decoders change a token's text depending on its neighbours (SentencePiece drops the
leading space of the first token it decodes). So, as in vLLM and TGI, we decode a small
window twice: the tokens already emitted since `prefix_offset` (context only) and the same
window plus the new tokens; the new text is the difference. While the window ends in U+FFFD
the character is incomplete and we wait for more tokens.

Stop strings may span token boundaries, so any tail of the text that could still grow into a
stop string is held back until it either completes one (stop: emit the text before it) or
cannot anymore (emit it).
"""

from collections.abc import Iterable, Sequence
from typing import Any

# Tokens of prompt context decoded along with the first new tokens (vLLM uses 5 too).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(s for s in stop if s)
        self._ids = list(prompt_token_ids)
        # ids[prefix_offset:read_offset] were emitted already and only give context;
        # ids[read_offset:] are decoded but not emitted yet (an incomplete character).
        self._prefix_offset = max(len(self._ids) - _CONTEXT_TOKENS, 0)
        self._read_offset = len(self._ids)
        self._held = ""  # decoded text held back because it may start a stop string
        self.stopped = False

    def step(self, new_token_ids: Sequence[int], *, check_stop: bool = True) -> tuple[str, bool]:
        """Add the newly generated tokens; return (text safe to emit now, stopped).

        Once a stop string is found the completion is over: the text before it is returned
        with stopped=True, and every later call returns ("", True). With check_stop=False
        (a completion short of its min_tokens) no stop string is looked for: the text is
        emitted whole, and later searches start after it.
        """
        if self.stopped:
            return "", True
        self._ids.extend(new_token_ids)
        text = self._decode_new(final=False)
        if not check_stop:
            text, self._held = self._held + text, ""
            return text, False
        return self._release(text, final=False)

    def flush(self) -> str:
        """The held-back text, for a completion that ended for another reason (length, EOS,
        stop token). An incomplete trailing character comes out as U+FFFD, as in a full
        `tokenizer.decode`."""
        if self.stopped:
            return ""
        text, _ = self._release(self._decode_new(final=True), final=True)
        return text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self, *, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # Shorter or equal: only skipped special tokens so far. Ending in U+FFFD: the last
        # character's bytes are not all there yet. Either way, wait for more tokens.
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, text: str, *, final: bool) -> tuple[str, bool]:
        pending = self._held + text
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return pending[:cut], True
        # Everything before the longest tail that could start a stop string is final: no stop
        # string starts there (the search above found none, and the tail is the earliest
        # position where one still could).
        keep = 0 if final else self._stop_prefix_len(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(found, default=None)

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
