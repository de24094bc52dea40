"""Tool calls, as a model makes them: validating ``tools`` / ``tool_choice`` the way OpenAI
does, deciding when to call one, and filling its arguments from its JSON schema.

A real model calls a tool when it has one to call and has not just been given a tool's
result; the simulator does the same, deterministically: with ``tools`` (and a
``tool_choice`` other than "none") and a last message that is not a ``tool`` result, it
calls the chosen function (or the first) with its required arguments filled in from the
schema and the user's words. After a ``tool`` message it answers with text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from core.simulator import textgen
from core.simulator.faults import ApiError

CHOICES = ("none", "auto", "required")


def _invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_tools(body: dict) -> tuple[list[dict] | None, Any]:
    """``tools`` and ``tool_choice`` checked as OpenAI checks them; raises ApiError (400)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid("tools", "Invalid type for 'tools': expected an array.", "invalid_type")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise _invalid(f"tools[{i}].function.name", f"Missing required parameter: 'tools[{i}].function.name'.",
                               "missing_required_parameter")
            if tool.get("type", "function") != "function":
                raise _invalid(f"tools[{i}].type", f"Invalid value: '{tool.get('type')}'. Supported values are: "
                                                   "'function' and 'custom'.")
    if choice is None:
        return tools, None
    if tools is None:
        raise _invalid("tool_choice", "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                                      "'tools' are specified.")
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise _invalid("tool_choice", f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', "
                                          "and 'required'.")
        return tools, choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise _invalid("tool_choice", "Invalid value for 'tool_choice': expected a string or an object naming "
                                      "a function.")
    if name not in {t["function"]["name"] for t in tools}:
        raise _invalid("tool_choice", f"Invalid value for 'tool_choice': function '{name}' not found in 'tools'.")
    return tools, choice


def chosen_tool(tools: list[dict] | None, choice: Any, messages: list[dict]) -> dict | None:
    """The function to call now, or None to answer with text."""
    if not tools or choice == "none" or (messages and messages[-1].get("role") == "tool"):
        return None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next(t["function"] for t in tools if t["function"]["name"] == name)
    return tools[0]["function"]


def arguments(function: dict, messages: list[dict]) -> str:
    """The call's arguments as JSON: each required property filled from its schema."""
    schema = function.get("parameters") or {}
    properties = schema.get("properties") or {}
    words = textgen.topic_words(textgen.last_user_text(messages)) or ["example"]
    # Names first: a string argument is most often a place, a person or a product.
    words.sort(key=lambda w: not w[:1].isupper())
    args = {}
    for i, name in enumerate(schema.get("required") or ()):
        args[name] = _value(properties.get(name) or {}, words[i % len(words)])
    return json.dumps(args)


def _value(schema: dict, word: str) -> Any:
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return word


def call_id(function: dict, messages: list[dict]) -> str:
    """A tool-call id, the same for the same request (so answers are reproducible)."""
    digest = hashlib.sha256(json.dumps([function.get("name"), messages], default=str).encode()).hexdigest()
    return "call_" + digest[:24]


def after_tool(messages: list[dict]) -> str:
    """The lead-in of the text answer that follows a tool's result."""
    result = messages[-1].get("content") or ""
    return f"The tool returned {result[:80]!s}. "
