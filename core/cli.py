"""`python -m core`: generate, stats, settings and the simulator, for scripts."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import GyroscopeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Gyroscope command line")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams to stdout)")
    g.add_argument("prompt")
    g.add_argument("--model")
    g.add_argument("--system")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--no-cache", action="store_true", help="bypass the response cache")
    g.add_argument("--refresh", action="store_true", help="fetch anew and replace the cached answer")
    g.add_argument("--optimize", action="store_true", help="optimize the prompt first")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    st = sub.add_parser("stats", help="totals from the request history")
    st.add_argument("--json", action="store_true")
    st.add_argument("--since", help="ISO date/time (UTC unless it has an offset)")
    st.add_argument("--until", help="ISO date/time, exclusive")

    se = sub.add_parser("settings", help="list or change settings")
    ses = se.add_subparsers(dest="action", required=True)
    sl = ses.add_parser("list")
    sl.add_argument("--json", action="store_true")
    sg = ses.add_parser("get")
    sg.add_argument("name")
    ss = ses.add_parser("set")
    ss.add_argument("name")
    ss.add_argument("value")

    si = sub.add_parser("simulator", help="run the OpenAI-compatible simulator")
    si.add_argument("--host", default="127.0.0.1")
    si.add_argument("--port", type=int, default=9100)
    si.add_argument("--ttft-ms", type=float, default=250)
    si.add_argument("--tokens-per-s", type=float, default=40)

    d = sub.add_parser("demo-history", help="fill the database with synthetic history")
    d.add_argument("--rows", type=int, default=5000)
    d.add_argument("--days", type=int, default=30)
    d.add_argument("--seed", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulator":
        from .simulator import serve
        print(f"Simulator on http://{args.host}:{args.port}/v1 (Ctrl+C to stop)", file=sys.stderr)
        serve(host=args.host, port=args.port, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s)
        return 0
    as_json = getattr(args, "json", False)
    try:
        return _run(args)
    except GyroscopeError as exc:
        if as_json:
            print(json.dumps({"error": exc.as_dict()}))
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from .service import Gyroscope
    gyro = Gyroscope()
    try:
        if args.command == "generate":
            return _generate(gyro, args)
        if args.command == "stats":
            from .history import Filters, parse_when
            stats = gyro.stats(Filters(start=parse_when(args.since), end=parse_when(args.until)))
            if args.json:
                print(json.dumps(stats, default=str))
            else:
                for key, value in stats.items():
                    print(f"{key:28} {value}")
            return 0
        if args.command == "settings":
            return _settings(gyro, args)
        if args.command == "demo-history":
            from .demo import fill_history
            n = fill_history(gyro.db, rows=args.rows, days=args.days, seed=args.seed)
            print(f"wrote {n} synthetic history rows to {gyro.db.path}")
            return 0
    finally:
        gyro.close()
    return 2


def _generate(gyro, args) -> int:
    from .models import GenerationRequest
    req = GenerationRequest(prompt=args.prompt, model=args.model, system=args.system,
                            max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed, cache=not args.no_cache, refresh=args.refresh,
                            optimize=True if args.optimize else None, source="cli")
    if args.json:
        result = gyro.generate(req, on_retry=lambda n: print(n.message, file=sys.stderr))
        out = result.as_dict()
        print(json.dumps({k: out[k] for k in ("content", "model", "finish_reason", "usage", "cost",
                                               "from_cache", "attempts", "outcome", "latency_ms")}))
        return 0
    with gyro.stream(req, events=True) as stream:
        for piece in stream:
            if isinstance(piece, str):
                sys.stdout.write(piece)
                sys.stdout.flush()
            elif piece is not None:
                print(f"\n[{piece.message}]", file=sys.stderr)
    sys.stdout.write("\n")
    return 0


def _settings(gyro, args) -> int:
    from .settings import SETTINGS, spec
    if args.action == "list":
        snap = gyro.settings.snapshot()
        if args.json:
            print(json.dumps({"version": snap.version, "settings": dict(snap)}))
        else:
            for s in SETTINGS:
                bounds = "" if s.min is None else f"  [{s.min:g}..{s.max:g}]"
                print(f"{s.name:32} {snap[s.name]!s:12} {s.help}{bounds}")
        return 0
    if args.action == "get":
        print(json.dumps(gyro.settings.get(spec(args.name).name)))
        return 0
    version = gyro.settings.set(args.name, args.value, actor="cli")
    print(f"{args.name} = {gyro.settings.get(args.name)!r} (settings version {version})")
    return 0
