"""The daemon's wire format: JSON-RPC 2.0, one JSON value per line; parsing, checks, encoding."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wordahead.types import MAX_K, KeyboardError

MAX_LINE_BYTES = 1024 * 1024  # a request line longer than this is refused, connection closed
MAX_BATCH = 1000  # requests in one batch
MAX_CONTEXT_CHARS = 64 * 1024  # the predictor reads the end of the context; more is a mistake

# JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# The server range (-32000 to -32099), documented in docs/protocol.md.
SERVER_ERROR = -32000  # an unexpected failure inside the daemon; its log has the traceback
MODEL_UNAVAILABLE = -32001  # the model or adapter cannot be loaded or run
TYPING_LOG_ERROR = -32002  # the typing log (SQLite) failed
PERSONALIZATION_BUSY = -32003  # a personalization job is already running
PERSONALIZATION_UNAVAILABLE = -32004  # reserved: no longer sent (was: personalization missing)
SHUTTING_DOWN = -32005  # the daemon is stopping; reconnect after it restarts
REQUEST_TOO_LARGE = -32006  # a line over MAX_LINE_BYTES; the connection is closed
OVERLOADED = -32007  # too many connections; try again shortly

_SURROGATE = re.compile(r"[\ud800-\udfff]")


class RpcError(KeyboardError):
    """A JSON-RPC error: a code from the table above and a message a person can act on. The
    daemon raises it to answer with an error; the client raises it when the answer is one."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


@dataclass(frozen=True)
class Request:
    """One call. `id` is absent for a notification (no answer is sent)."""

    method: str
    params: dict[str, Any] | list[Any] = field(default_factory=dict)
    id: str | int | float | None = None
    notification: bool = False


@dataclass(frozen=True)
class Invalid:
    """A batch item or line that is not a request: its error response (id null unless known)."""

    error: RpcError
    id: str | int | float | None = None


Parsed = Request | Invalid


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_line(line: bytes) -> Any:
    """The JSON value on one line (UTF-8). Raises RpcError(PARSE_ERROR) with the reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RpcError(
            PARSE_ERROR, f"the request is not valid UTF-8 (bad byte at offset {exc.start})"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RpcError(PARSE_ERROR, "the request is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise RpcError(
            PARSE_ERROR, f"the request is not valid JSON ({exc}); send one JSON object per line"
        ) from None


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int))


def parse_request(obj: Any) -> Parsed:
    """Check one decoded value against JSON-RPC 2.0's request object."""
    if not isinstance(obj, dict):
        return Invalid(
            RpcError(INVALID_REQUEST, f"a request is a JSON object, not {_json_type(obj)}")
        )
    request_id = obj.get("id")
    has_id = "id" in obj
    if not _valid_id(request_id):
        return Invalid(RpcError(INVALID_REQUEST, "id must be a string, a number or null"))
    if obj.get("jsonrpc") != "2.0":
        return Invalid(RpcError(INVALID_REQUEST, 'the request needs "jsonrpc": "2.0"'), request_id)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return Invalid(
            RpcError(INVALID_REQUEST, 'the request needs "method": a non-empty string'),
            request_id,
        )
    params = obj.get("params", {})
    if not isinstance(params, (dict, list)):
        return Invalid(
            RpcError(INVALID_REQUEST, "params must be an object (by name) or an array"),
            request_id,
        )
    unknown = set(obj) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        return Invalid(
            RpcError(INVALID_REQUEST, f"unknown request member(s): {', '.join(sorted(unknown))}"),
            request_id,
        )
    return Request(method=method, params=params, id=request_id, notification=not has_id)


def parse_line(line: bytes) -> tuple[list[Parsed], bool]:
    """The requests on one line and whether it was a batch. Never raises."""
    try:
        obj = decode_line(line)
    except RpcError as exc:
        return [Invalid(exc)], False
    if isinstance(obj, list):
        if not obj:
            return [Invalid(RpcError(INVALID_REQUEST, "an empty batch is not a request"))], False
        if len(obj) > MAX_BATCH:
            message = f"a batch holds at most {MAX_BATCH} requests; this one has {len(obj)}"
            return [Invalid(RpcError(INVALID_REQUEST, message))], False
        return [parse_request(item) for item in obj], True
    return [parse_request(obj)], False


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- parameters -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One named parameter: its JSON type, whether it is required, its default."""

    name: str
    kind: type
    required: bool = False
    default: Any = None


# Method name -> its parameters in positional order. The server implements exactly these.
METHODS: dict[str, tuple[Param, ...]] = {
    "predict": (Param("context", str, required=True), Param("k", int, default=3)),
    "phrase": (Param("context", str, required=True),),
    "observe": (
        Param("text", str, required=True),
        Param("source", str, default=""),
        Param("private", bool, default=False),
    ),
    "feedback": (Param("context", str, required=True), Param("accepted", str, required=True)),
    "status": (),
    "train": (Param("wait", bool, default=False), Param("force", bool, default=False)),
    "forget": (
        Param("since", str),
        Param("until", str),
        Param("source", str),
        Param("all", bool, default=False),
    ),
    "reload": (),
    "pause": (),
    "resume": (),
}

_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false"}


def bind_params(method: str, params: Mapping[str, Any] | list[Any]) -> dict[str, Any]:
    """Named, type-checked parameters for `method` with defaults filled in.

    Raises RpcError(METHOD_NOT_FOUND) for an unknown method, RpcError(INVALID_PARAMS) for
    missing, unknown or mistyped parameters.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise RpcError(
            METHOD_NOT_FOUND,
            f"no method {method!r}; the methods are: {', '.join(METHODS)}",
        )
    names = [p.name for p in spec]
    if isinstance(params, list):
        if len(params) > len(spec):
            raise RpcError(
                INVALID_PARAMS,
                f"{method} takes at most {len(spec)} positional parameter(s) "
                f"({', '.join(names) or 'none'}); got {len(params)}",
            )
        params = dict(zip(names, params))
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise RpcError(
            INVALID_PARAMS,
            f"{method} has no parameter {unknown[0]!r}; "
            + (f"it takes: {', '.join(names)}" if names else "it takes none"),
        )
    bound: dict[str, Any] = {}
    for p in spec:
        value = params.get(p.name)
        if value is None:
            if p.required:
                raise RpcError(INVALID_PARAMS, f"{method} needs {p.name!r} ({_TYPE_NAMES[p.kind]})")
            bound[p.name] = p.default
            continue
        # bool is an int in Python, but never in JSON.
        if not isinstance(value, p.kind) or (p.kind is int and isinstance(value, bool)):
            raise RpcError(
                INVALID_PARAMS,
                f"{method}: {p.name!r} must be {_TYPE_NAMES[p.kind]}, not {_json_type(value)}",
            )
        if isinstance(value, str) and _SURROGATE.search(value):
            raise RpcError(
                INVALID_PARAMS,
                f"{method}: {p.name!r} holds a lone UTF-16 surrogate escape; send valid Unicode",
            )
        bound[p.name] = value
    return bound


def check_predict(params: dict[str, Any]) -> None:
    """Ranges the types alone do not say."""
    k = params["k"]
    if not 1 <= k <= MAX_K:
        raise RpcError(INVALID_PARAMS, f"predict: k must be between 1 and {MAX_K}, got {k}")
    if len(params["context"]) > MAX_CONTEXT_CHARS:
        raise RpcError(
            INVALID_PARAMS,
            f"predict: context is {len(params['context']):,} characters; send at most "
            f"{MAX_CONTEXT_CHARS:,} (the text just before the cursor is what matters)",
        )


# --- responses --------------------------------------------------------------------------------
def result_response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_json()}


def encode(message: Any) -> bytes:
    """One response (or batch of responses) as a UTF-8 line. Raises ValueError if it is not
    JSON-encodable (NaN, a non-JSON type), so the caller can answer with an error instead."""
    try:
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate made it into a result: escape it instead
        text = json.dumps(message, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        return text.encode("ascii") + b"\n"
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


def request_line(method: str, params: Mapping[str, Any] | None, request_id: Any) -> bytes:
    """A client's request line; `request_id=None` makes it a notification."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params:
        message["params"] = dict(params)
    if request_id is not None:
        message["id"] = request_id
    return encode(message)
