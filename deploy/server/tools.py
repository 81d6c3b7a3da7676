"""Tool calling on chat: how the tools reach the prompt, and the grammar the calls follow.

A call is written the way Hermes-style models (Qwen2's chat template among them) write
it, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The prompt: a chat template that renders `tools` (it mentions them) gets the tools and the
earlier calls and results natively. Any other template (SmolLM2's has no tool support)
gets them as text: `TOOLS_PROMPT` with the tools' JSON definitions appended to the system
message (one is added if there is none), earlier calls written as the blocks above in the
assistant's content, and tool results as user turns wrapped in
`<tool_response>...</tool_response>`.

The grammar, by tool_choice (`tool_grammar`), with each call's arguments held to its
function's JSON schema by llguidance:
- none: no tools in the prompt, no grammar, the answer is text;
- auto: free text, in which the text `<tool_call>` starts a call that must then be
  complete and valid (a lazy trigger), any number of times;
- required: one call (or several, one per line, with parallel_tool_calls), nothing else;
- a named function: exactly one call of it.
`deploy.server.tool_parser` reads the calls back out of the generated text.
"""

import json
from typing import Any

from actors import grammar
from deploy.server.protocol import ChatMessage, ChatTool, NamedToolChoice

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}

TOOLS_PROMPT = """\
You can call functions (tools). These are available, one JSON definition per line:
<tools>
{definitions}
</tools>
To call one, answer with one block per call, exactly like this:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Otherwise answer normally."""


def template_renders_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def call_text(name: str, arguments: Any) -> str:
    """One call as the model writes it."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(arguments)}}}\n{CALL_CLOSE}'


def conversation(messages: list[ChatMessage], tools: list[ChatTool], native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages for the chat template, the `tools` argument for it): with native tool
    support, calls and results pass through; otherwise they become text (module docstring)."""
    if native:
        return [_native(m) for m in messages], [t.model_dump(exclude_none=True) for t in tools] or None
    out = [_as_text(m) for m in messages]
    if tools:
        definitions = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
        block = TOOLS_PROMPT.format(definitions=definitions)
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def _role(m: ChatMessage) -> str:
    return "system" if m.role == "developer" else m.role


def _arguments(call) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def _native(m: ChatMessage) -> dict:
    out: dict[str, Any] = {"role": _role(m), "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": _arguments(c)}} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _as_text(m: ChatMessage) -> dict:
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"}
    calls = [call_text(c.function.name, _arguments(c)) for c in m.tool_calls or []]
    return {"role": _role(m), "content": "\n".join(filter(None, [m.content, *calls]))}


def tool_grammar(tools: list[ChatTool], mode: str | NamedToolChoice, parallel: bool) -> str | None:
    """The llguidance grammar of the answer for this tool_choice, or None (none)."""
    if mode == "none" or not tools:
        return None
    names = {t.function.name: i for i, t in enumerate(tools)}
    chosen = [names[mode.function.name]] if isinstance(mode, NamedToolChoice) else range(len(tools))
    rules = [f"fn_{i}: " + json.dumps(f'{{"name": {json.dumps(tools[i].function.name)}, "arguments": ')
             + " " + grammar.json_in_lark(_parameters(tools[i], i), f"tools.{i}.function.parameters")
             + ' "}"' for i in chosen]
    body = " | ".join(f"fn_{i}" for i in chosen)
    if mode == "auto":  # text until `<tool_call>` appears, then a whole call; repeat
        start = ["start: tool_call* TEXT",
                 "TEXT: /(.|\\n)*/",
                 f"call_open[lazy]: TEXT {json.dumps(CALL_OPEN)}",
                 f"tool_call: call_open \"\\n\" ({body}) {json.dumps(chr(10) + CALL_CLOSE)}"]
    else:
        calls = "tool_call (\"\\n\" tool_call)*" if mode == "required" and parallel else "tool_call"
        start = [f"start: {calls}",
                 f"tool_call: {json.dumps(CALL_OPEN + chr(10))} ({body}) {json.dumps(chr(10) + CALL_CLOSE)}"]
    return grammar.lark_grammar("\n".join(["%llguidance {}", *start, *rules]), "tools")


def _parameters(tool: ChatTool, index: int) -> dict[str, Any]:
    schema = tool.function.parameters
    if schema is None:
        return NO_ARGUMENTS
    grammar.json_schema_grammar(schema, f"tools.{index}.function.parameters")  # its own errors, named
    return schema
