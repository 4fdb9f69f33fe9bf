"""OpenAI conversation items (messages) shared by the Responses and Conversations APIs.

Only message items with text content are supported; anything else is a clear 400.
Items are normalised to ``{"type": "message", "role", "content": [{"type", "text"}], "status"}``.
"""

from __future__ import annotations

from typing import Any

from skyfleet.errors import InvalidRequestError

_ROLES = {"user", "assistant", "system", "developer"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
MAX_ITEMS = 1000
MAX_METADATA = 16


def _parts(content: Any, role: str, where: str) -> list[dict[str, str]]:
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        return [{"type": text_type, "text": content}]
    if not isinstance(content, list) or not content:
        raise InvalidRequestError(f"'{where}.content' must be a string or a non-empty list of parts.",
                                  param=f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, dict) else None
        if not isinstance(ptype, str) or ptype not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequestError(
                f"'{where}.content.{j}': only text parts (input_text, output_text) are supported.",
                param=f"{where}.content.{j}")
        parts.append({"type": text_type if ptype == "text" else ptype, "text": part["text"]})
    return parts


def normalise_items(value: Any, param: str) -> list[dict[str, Any]]:
    """A Responses ``input`` (string or list of items) as normalised message items."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": _parts(value, "user", param), "status": "completed"}]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"'{param}' must be a string or a non-empty list of items.", param=param)
    if len(value) > MAX_ITEMS:
        raise InvalidRequestError(f"'{param}' has more than {MAX_ITEMS} items.", param=param)
    out = []
    for i, item in enumerate(value):
        where = f"{param}.{i}"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"'{where}' must be an object.", param=where)
        if item.get("type", "message") != "message":
            raise InvalidRequestError(f"'{where}': only message items are supported.", param=f"{where}.type")
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRequestError(f"'{where}.role' must be one of user, assistant, system, developer.",
                                      param=f"{where}.role")
        out.append({"type": "message", "role": role, "content": _parts(item.get("content"), role, where),
                    "status": "completed"})
    return out


def item_text(item: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in item.get("content", ()) if isinstance(p, dict))


def to_chat_messages(items: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Message items as chat-completions messages (the engines' common language)."""
    messages = []
    for item in items:
        if item.get("type") != "message":
            continue
        role = "system" if item["role"] == "developer" else item["role"]
        messages.append({"role": role, "content": item_text(item)})
    return messages


def check_metadata(value: Any, param: str = "metadata") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        raise InvalidRequestError(f"'{param}' must be an object with at most {MAX_METADATA} keys.", param=param)
    for k, v in value.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise InvalidRequestError(
                f"'{param}': keys are strings of at most 64 characters, values strings of at most 512.",
                param=param)
    return dict(value)


def item_json(item: dict[str, Any], item_id: str) -> dict[str, Any]:
    return {"id": item_id, **item}


def list_json(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
