"""What every /api handler shares: the service, the JSON body, and errors as answers."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import GyroscopeError, InvalidParameter
from ..portal import off_loop
from ..service import current_service, default_service
from . import guard

STATUS = {"rejected": 400, "invalid_parameter": 400, "prompt_too_long": 400, "config": 400,
          "circuit_open": 503, "rate_limited": 429, "quota_exhausted": 402, "retry_later": 503,
          "budget_exceeded": 402, "model_not_found": 404, "bad_request": 400, "auth": 502, "cancelled": 499,
          "storage": 503}


def error_response(exc: GyroscopeError) -> JSONResponse:
    """A core error as a JSON answer with its status (and Retry-After when it has one)."""
    headers = {}
    if exc.retry_in_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_in_s)))
    return JSONResponse({"error": exc.as_dict()}, status_code=STATUS.get(exc.kind, 502),
                        headers=headers)


def refusal(status: int, kind: str, message: str, **headers: str) -> JSONResponse:
    """An /api refusal that is not a core error (admin sign-in, not found)."""
    return JSONResponse({"error": {"kind": kind, "message": message, "retry_in_s": None}},
                        status_code=status, headers=headers or None)


async def service():
    """The process-wide service, built off the event loop the first time (opening the file
    and applying migrations wait for it, up to its busy timeout when another program
    locks it)."""
    return current_service() or await off_loop(default_service)


async def json_body(request: Request, empty: Any = None) -> Any:
    """The parsed body (already parsed by the guard when it runs; ``empty`` when there is
    none and that is allowed), or InvalidParameter saying what is wrong with it."""
    if guard.PARSED_KEY in request.scope:
        return request.scope[guard.PARSED_KEY]
    raw = await request.body()
    if not raw and empty is not None:
        return empty
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidParameter("The JSON body is nested too deeply. Send a flat object, e.g. "
                               "{\"prompt\": \"Hello\"}.") from None
    except UnicodeDecodeError:
        raise InvalidParameter("The body must be UTF-8 JSON, e.g. {\"prompt\": \"Hello\"}.") from None
    except json.JSONDecodeError:
        raise InvalidParameter("The body must be JSON, e.g. {\"prompt\": \"Hello\"}.") from None
    except ValueError:   # Python refuses to read integers of more than 4,300 digits
        raise InvalidParameter("A number in the JSON body has too many digits. Send numbers "
                               "in their usual range, e.g. \"max_tokens\": 256.") from None
