"""The maintainer's routes: clear the cache, reset breakers, read and change settings.

    POST  /api/cache/clear     {"before": "YYYY-MM-DD"} optional
    POST  /api/breaker/reset   {"upstream": ..., "model": ...} optional: all, one upstream, one breaker
    GET   /api/settings        every setting and the settings version
    PATCH /api/settings        {"retry.max_retries": 2, ...}: all valid and stored, or nothing

With GYROSCOPE_ADMIN_PASSWORD set, each needs it in ``X-Admin-Password`` (a wrong one pauses
that client like the Settings page's sign-in); with only GYROSCOPE_API_TOKEN set, the token
the guard already checked is enough. Every change goes through core/admin.py and the
settings store, so it is audited as the page's and the CLI's are, with the actor
'api:admin', 'api:token' or 'api:local' (neither secret set: loopback callers only).
"""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request
from starlette.responses import JSONResponse

from .. import admin
from ..errors import GyroscopeError, InvalidParameter
from ..portal import off_loop
from . import schemas
from .answers import error_response, json_body, refusal, service


async def _actor(request: Request, gyro) -> str | JSONResponse:
    """Who is acting, or the refusal to send."""
    expected = gyro.config.admin_password
    if not expected:
        return "api:token" if gyro.config.api_token else "api:local"
    given = request.headers.get("x-admin-password")
    if given is None:
        return refusal(401, "admin_required", "This needs the admin password: send it in the "
                       "X-Admin-Password header (GYROSCOPE_ADMIN_PASSWORD is set). Nothing was changed.")
    client = request.client.host if request.client else None
    # The gate's pause for a wrong password sleeps: off the event loop.
    verdict = await off_loop(admin.sign_in, client, given, expected)
    if not verdict.ok:
        return refusal(403, "admin_refused", f"{verdict.message} Nothing was changed.")
    return "api:admin"


async def _admin(request: Request, model=None):
    """(service, actor, validated body) or a JSONResponse refusal."""
    try:
        gyro = await service()
    except GyroscopeError as exc:
        return error_response(exc)
    actor = await _actor(request, gyro)
    if isinstance(actor, JSONResponse):
        return actor
    body = None
    if model is not None:
        try:
            body = schemas.validate(model, await json_body(request, empty={}))
        except GyroscopeError as exc:
            return error_response(exc)
    return gyro, actor, body


async def cache_clear(request: Request) -> JSONResponse:
    got = await _admin(request, schemas.CacheClearBody)
    if isinstance(got, JSONResponse):
        return got
    gyro, actor, body = got
    try:
        before = dt.date.fromisoformat(body.before) if body.before else None
    except ValueError:
        return error_response(InvalidParameter(f"before must be a real day, e.g. 2026-11-30 "
                                               f"(got {body.before!r})."))
    try:
        removed = await off_loop(admin.clear_cache, gyro, actor, before)
    except GyroscopeError as exc:
        return error_response(exc)
    return JSONResponse({"removed": removed})


def breaker_info(info: dict) -> dict:
    """One breaker as /api shows it: its upstream (credentials stripped), model and figures."""
    upstream, _, model = admin.breaker_label(info["name"]).partition("|")
    rate = info.get("mode") == "rate"
    out = {"upstream": upstream, "model": model, "state": info.get("state", "unknown"),
           "mode": info.get("mode"),
           "failures": info.get("window_failures" if rate else "fail_counter", 0) or 0}
    for key in ("window_calls", "window_failures", "window_running", "fail_counter",
                "success_counter", "retry_in_s", "next_probe_at"):
        if key in info:
            out[key] = info[key]
    opened = info.get("opened_at")
    out["opened_at"] = opened if opened is None or isinstance(opened, (int, float)) else str(opened)
    return out


async def breaker_reset(request: Request) -> JSONResponse:
    got = await _admin(request, schemas.BreakerResetBody)
    if isinstance(got, JSONResponse):
        return got
    gyro, actor, body = got

    def reset() -> list[dict]:
        chosen = [i for i in gyro.breakers.all_info() if "|" in i["name"]]
        shown = [breaker_info(i) for i in chosen]
        picked = [(i, s) for i, s in zip(chosen, shown)
                  if body.upstream in (None, s["upstream"]) and body.model in (None, s["model"])]
        if not picked and (body.upstream or body.model):
            known = sorted({s["upstream"] for s in shown})
            raise InvalidParameter(f"There is no breaker for upstream {body.upstream!r}"
                                   f"{f' and model {body.model!r}' if body.model else ''}. "
                                   f"Upstreams: {', '.join(known) or 'none yet'}.")
        for info, _ in picked:
            gyro.breakers.get(*info["name"].split("|", 1)).reset(actor)
        gyro.db.flush()
        return [breaker_info(gyro.breakers.get(*i["name"].split("|", 1)).info()) for i, _ in picked]

    try:
        return JSONResponse({"reset": await off_loop(reset)})
    except InvalidParameter as exc:
        return refusal(404, "not_found", exc.user_message)
    except GyroscopeError as exc:
        return error_response(exc)


async def settings_get(request: Request) -> JSONResponse:
    got = await _admin(request)
    if isinstance(got, JSONResponse):
        return got
    gyro = got[0]
    snap = gyro.settings.snapshot()
    return JSONResponse({"version": snap.version, "settings": dict(snap)})


async def settings_patch(request: Request) -> JSONResponse:
    got = await _admin(request, schemas.SettingsPatch)
    if isinstance(got, JSONResponse):
        return got
    gyro, actor, body = got
    values = body.model_dump(by_alias=True, exclude_unset=True)

    def store() -> tuple[list[str], dict]:
        # Only what differs is stored (and audited); all of it in one transaction, or nothing.
        changed = admin.changed_values(values, gyro.settings.snapshot())
        if changed:
            gyro.settings.set_many(changed, actor=actor)
        return sorted(changed), gyro.settings.snapshot()

    try:
        changed, snap = await off_loop(store)
    except GyroscopeError as exc:
        return error_response(exc)
    return JSONResponse({"version": snap.version, "changed": changed, "settings": dict(snap)})
