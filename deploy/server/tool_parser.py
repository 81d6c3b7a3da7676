"""Tool calls read back out of generated text, incrementally, as OpenAI streams them.

The text follows `deploy.server.tools`' format (its grammar makes sure of it):

    [content] <tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call> [content] ...

`feed` takes each new piece of text and returns what can be said already: content, and
tool-call deltas: the first of a call carries its index, a fresh id, type and name; then
come fragments of ARGS as they are generated. ARGS ends at `}\\n</tool_call>`: the grammar
writes JSON without free whitespace, and a newline inside a JSON string is escaped, so
that text cannot occur inside ARGS. A held-back tail that might be the start of a marker
is released once it cannot. Whitespace is said only before more content (so none
between calls, none at the end).
"""

import re
import uuid

from deploy.server.responses import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from deploy.server.tools import CALL_CLOSE, CALL_OPEN

_HEAD = re.compile(r'\n\{"name": "([^"\\]*)", "arguments": ')
_ARGS_END = "}\n" + CALL_CLOSE


class ToolCallParser:
    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""  # all content so far
        self._buffer = ""  # text not yet said
        self._in = "content"  # content | head (after <tool_call>) | arguments
        self._space = ""  # trailing whitespace of the content, said only if more content follows

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(new content, new tool-call deltas) for the next piece of generated text."""
        self._buffer += text
        content, deltas = "", []
        while True:
            if self._in == "content":
                before, found = _split(self._buffer, CALL_OPEN)
                said = before if found else before[: len(before) - _marker_prefix(before, CALL_OPEN)]
                content += said
                self._buffer = self._buffer[len(said) + (len(CALL_OPEN) if found else 0):]
                if not found:
                    break
                self._in = "head"
            elif self._in == "head":
                match = _HEAD.match(self._buffer)
                if match is None:
                    break
                self.calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                                           function=FunctionCall(name=match.group(1), arguments="")))
                call = self.calls[-1]
                deltas.append(ToolCallDelta(index=len(self.calls) - 1, id=call.id, type="function",
                                            function=FunctionCallDelta(name=call.function.name)))
                self._buffer = self._buffer[match.end():]
                self._in = "arguments"
            else:
                args, found = _split(self._buffer, _ARGS_END)
                said = args if found else args[: len(args) - _marker_prefix(args, _ARGS_END)]
                if said:
                    self.calls[-1].function.arguments += said
                    deltas.append(ToolCallDelta(index=len(self.calls) - 1, function=FunctionCallDelta(arguments=said)))
                self._buffer = self._buffer[len(said) + (len(_ARGS_END) if found else 0):]
                if not found:
                    break
                self._in = "content"
        return self._said(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the text: whatever is held back. An unfinished call head (the
        output was cut short) comes out as content."""
        rest = self._buffer if self._in == "content" else CALL_OPEN + self._buffer if self._in == "head" else ""
        deltas = []
        if self._in == "arguments" and self._buffer:
            self.calls[-1].function.arguments += self._buffer
            deltas.append(ToolCallDelta(index=len(self.calls) - 1, function=FunctionCallDelta(arguments=self._buffer)))
        self._buffer, self._in = "", "content"
        return self._said(rest), deltas

    def _said(self, content: str) -> str:
        """Content to send, holding trailing whitespace back until more content follows."""
        content = self._space + content
        said = content.rstrip()
        self._space = content[len(said):]
        self.content += said
        return said


def _split(text: str, marker: str) -> tuple[str, bool]:
    """(text before the first `marker`, whether it occurs)."""
    at = text.find(marker)
    return (text, False) if at < 0 else (text[:at], True)


def _marker_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
