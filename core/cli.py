"""`python -m core`: generate, stats, settings, doctor and the simulator, for scripts."""

from __future__ import annotations

import argparse
import getpass
import json
import sqlite3
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
    ss = ses.add_parser("set", description="Change one setting. When GYROSCOPE_ADMIN_PASSWORD "
                        "is set, the admin password is asked for (or read from stdin with "
                        "--password-stdin); the change is audited as cli:<user>.")
    ss.add_argument("name")
    ss.add_argument("value")
    ss.add_argument("--password-stdin", action="store_true",
                    help="read the admin password from the first line of stdin (for scripts)")

    si = sub.add_parser("simulator", help="run the OpenAI-compatible simulator")
    si.add_argument("--host", default="127.0.0.1")
    si.add_argument("--port", type=_port, default=9100, help="0-65535 (0: any free port)")
    si.add_argument("--ttft-ms", type=float, default=250)
    si.add_argument("--tokens-per-s", type=float, default=40)

    from .batch.cli import add_commands
    add_commands(sub)

    dr = sub.add_parser("doctor", help="check the configured storage backends (SQLite, Redis, "
                        "PostgreSQL) and how they answer; exit code 1 when one fails")
    dr.add_argument("--json", action="store_true")

    d = sub.add_parser("demo-history", help="fill the database with synthetic history")
    d.add_argument("--rows", type=int, default=5000)
    d.add_argument("--days", type=int, default=30)
    d.add_argument("--seed", type=int, default=1)
    return p


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; pick one from 1024 to "
                                         "65535 (0 takes any free port)")
    return port


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulator":
        return _simulator(args)
    as_json = getattr(args, "json", False)
    try:
        if args.command == "doctor":     # never builds the service: a failing backend is reported
            from .config import load_config
            from .storage import doctor
            return doctor.main(load_config(), as_json)
        return _run(args)
    except GyroscopeError as exc:
        if as_json:
            print(json.dumps({"error": exc.as_dict()}))
        print(f"error: {exc.user_message}", file=sys.stderr)
        return 1


def _simulator(args) -> int:
    from .simulator import serve
    print(f"Simulator on http://{args.host}:{args.port}/v1 (Ctrl+C to stop)", file=sys.stderr)
    try:
        serve(host=args.host, port=args.port, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s)
    except ValueError as exc:   # a negative --ttft-ms or --tokens-per-s, named by the simulator
        print(f"error: {exc}.", file=sys.stderr)
        return 1
    except (OSError, OverflowError) as exc:   # a port taken or out of reach, an unknown host
        print(f"error: cannot listen on {args.host}:{args.port} ({exc}). Pick another --host "
              "or --port.", file=sys.stderr)
        return 1
    return 0


def _run(args) -> int:
    from .db import storage_error
    from .service import Gyroscope
    gyro = Gyroscope()
    try:
        return _command(gyro, args)
    except sqlite3.Error as exc:   # a read straight on a reader connection (stats on a damaged file)
        raise storage_error(exc, gyro.db.path) from None
    finally:
        gyro.close()


def _command(gyro, args) -> int:
    """Run one command other than the simulator; returns the exit code."""
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
    if args.command in ("batch", "jobs"):
        from .batch import cli as batch_cli
        return (batch_cli.batch_command if args.command == "batch" else batch_cli.jobs_command)(gyro, args)
    if args.command == "demo-history":
        from .demo import fill_history
        n = fill_history(gyro.history.db, rows=args.rows, days=args.days, seed=args.seed)
        skipped = f" ({args.rows - n} identical rows were already there)" if n < args.rows else ""
        print(f"wrote {n} synthetic history rows to {gyro.db.path}{skipped}")
        return 0
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
    from .models import Thinking
    thinking = False            # a reasoning model's thinking goes to stderr, apart from the answer
    with gyro.stream(req, events=True) as stream:
        for piece in stream:
            if isinstance(piece, Thinking):
                if not thinking:
                    sys.stderr.write("[thinking] ")
                    thinking = True
                sys.stderr.write(piece.text)
                sys.stderr.flush()
                continue
            if thinking and piece is not None:
                sys.stderr.write("\n[answer]\n")
                thinking = False
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
            from .admin import describe
            for s in SETTINGS:     # help, bounds, choices and default, as the page shows them
                print(f"{s.name:32} {snap[s.name]!s:12} {describe(s)}")
        return 0
    if args.action == "get":
        print(json.dumps(gyro.settings.get(spec(args.name).name)))
        return 0
    actor = _cli_actor()
    if gyro.config.admin_password:
        _sign_in(gyro.config.admin_password, args.password_stdin)
    version = gyro.settings.set(args.name, args.value, actor=actor)
    print(f"{args.name} = {gyro.settings.get(args.name)!r} (settings version {version})")
    return 0


def _cli_actor() -> str:
    """'cli:<os user>', how the audit trail names a change made here."""
    try:
        user = getpass.getuser()
    except Exception:   # no user name in a bare container (KeyError, OSError)
        return "cli"
    # $USER may hold bytes that are not UTF-8 (surrogate-escaped); the audit row must store.
    return f"cli:{user.encode('utf-8', 'replace').decode()}"


def _sign_in(expected: str, from_stdin: bool) -> None:
    """Ask for the admin password (tty) or read it (--password-stdin); RequestRejected if wrong."""
    from .admin import sign_in
    from .errors import RequestRejected
    if from_stdin:
        given = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        given = getpass.getpass("Admin password (GYROSCOPE_ADMIN_PASSWORD is set): ")
    else:
        raise RequestRejected("Changing settings needs the admin password (GYROSCOPE_ADMIN_PASSWORD "
                              "is set). Run this in a terminal to be asked for it, or pipe it in "
                              "with --password-stdin. Nothing was changed.")
    verdict = sign_in(None, given, expected)
    if not verdict.ok:
        raise RequestRejected(f"{verdict.message} Nothing was changed.")
