"""Tool calls on /v1/chat/completions: the tools go to the model's chat template, the model's own tool-call
syntax is parsed back into OpenAI `tool_calls`, and `tool_choice` "required" or a named function is enforced
by a grammar whose JSON is the function's parameter schema.

Two syntaxes cover the open families whose templates take `tools`: Hermes' (Qwen 2.5 and 3, SmolLM3, Hermes
finetunes), `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` once per call; and Llama 3.1+'s,
a bare `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` where the model writes one)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from llmctl.infer.constraints import JSON_LAYOUT, ConstraintSpec


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    opener: str  # what a reply that calls a tool begins with
    arguments_key: str  # "arguments" (Hermes) or "parameters" (Llama)
    wrapped: bool  # each call inside <tool_call> ... </tool_call>

    def render_call(self, body: str) -> str:
        return f"<tool_call>\n{body}\n</tool_call>" if self.wrapped else body


HERMES = ToolSyntax("hermes", "<tool_call>", "arguments", wrapped=True)
LLAMA = ToolSyntax("llama", "{", "parameters", wrapped=False)
CALL_PATTERN = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def syntax_of(template_source: str) -> ToolSyntax:
    """The tool-call syntax a template teaches its model: Hermes' where it writes <tool_call> tags, else
    Llama's JSON."""
    return HERMES if "<tool_call>" in template_source else LLAMA


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str

    def wire(self, index: int | None = None) -> dict:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def call_grammar(functions: list[dict], syntax: ToolSyntax, several: bool = True) -> ConstraintSpec:
    """A grammar that admits only calls of `functions` (OpenAI function objects), each call's arguments
    matching its parameter schema; one call, or with `several` in Hermes' syntax, several in a row."""
    bodies = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                syntax.arguments_key: function.get("parameters") or {"type": "object"},
            },
            "required": ["name", syntax.arguments_key],
            "additionalProperties": False,
        }
        for function in functions
    ]
    schema = json.dumps({"anyOf": bodies, "x-guidance": JSON_LAYOUT})
    if syntax.wrapped:
        repeat = ' ("\\n" call)*' if several else ""
        lark = f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {schema}'
    else:
        lark = f"start: body\nbody: %json {schema}"
    return ConstraintSpec("grammar", lark)


def parse_tool_calls(text: str, syntax: ToolSyntax, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls, or None if there is none; the calls), where each call names one of the
    tools and carries a JSON object; text with no well-formed call is all content."""
    if syntax.wrapped:
        found = [(match.span(), match.group(1)) for match in CALL_PATTERN.finditer(text)]
    else:
        start = text.find("{")
        found = [((start, len(text)), text[start:])] if start >= 0 else []
    calls, spans = [], []
    for span, body in found:
        call = _call(body.strip(), syntax, names)
        if call is not None:
            calls.append(call)
            spans.append(span)
    if not calls:
        return text, []
    content, position = [], 0
    for start, end in spans:
        content.append(text[position:start])
        position = end
    content.append(text[position:])
    rest = "".join(content).replace("<|python_tag|>", "").strip()
    return rest or None, calls


def _call(body: str, syntax: ToolSyntax, names: set[str]) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get(syntax.arguments_key, value.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments), "call_" + uuid.uuid4().hex[:24])


def may_become_call(text: str, syntax: ToolSyntax) -> bool:
    """Whether streamed text could still be (the start of) a tool call, so it is held back, not shown."""
    stripped = text.lstrip().removeprefix("<|python_tag|>")
    return syntax.opener.startswith(stripped) or stripped.startswith(syntax.opener)
