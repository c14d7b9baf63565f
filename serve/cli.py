"""The `homefire` command: serve, chat, and manage companions.

Run `homefire --help`, or `homefire COMMAND --help` for one command.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from memory.cards import parse_card
from memory.companions import CompanionError, CompanionStore, load_dir
from memory.db import Database
from serve.client import Client, ServerError, running_url, server_file
from serve.config import ConfigError, check_exposure, default_data_dir, load_settings


class UsageError(RuntimeError):
    """A mistake on the command line; printed without a traceback."""


def _data_dir(args: argparse.Namespace) -> Path:
    return (args.data_dir or default_data_dir()).expanduser().resolve()


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from serve.app import create_app

    settings = load_settings(args.config)
    settings.host = args.host or settings.host
    settings.port = settings.port if args.port is None else args.port
    check_exposure(settings)
    load_dir(settings.companions_dir)  # fail here, with the file named, not mid-start-up
    data_dir = _data_dir(args)
    (data_dir / "run").mkdir(parents=True, exist_ok=True)
    lock = (data_dir / "run" / "serve.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"another `homefire serve` already uses {data_dir} "
                         f"(at {running_url(data_dir) or 'an unknown address'}); stop it first, "
                         "or pass another --data-dir") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        sock = socket.create_server((settings.host, settings.port), family=family)
    except OSError as err:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {err.strerror}") from err
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
    url = f"http://{host}:{port}"
    server_file(data_dir).write_text(json.dumps({"url": url, "pid": os.getpid()}))
    logging.getLogger("homefire").info("listening on %s (data in %s)", url, data_dir)
    app = create_app(settings, data_dir)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server_file(data_dir).unlink(missing_ok=True)


def _client(args: argparse.Namespace) -> Client:
    url = args.url or running_url(_data_dir(args))
    if url is None:
        raise UsageError(f"no Homefire server is running for {_data_dir(args)}; start one with "
                         "`homefire serve`, or pass --url")
    return Client(url)


def cmd_chat(args: argparse.Namespace) -> None:
    client = _client(args)
    companion = args.companion or "ember"
    if args.conversation:
        data = client.request("GET", f"/api/v1/conversations/{args.conversation}")
        conversation_id = data["conversation"]["id"]
        for m in data["messages"][-6:]:
            print(f"{'you' if m['role'] == 'user' else companion}> {m['content']}")
    else:
        data = client.request("POST", "/api/v1/conversations", json={"companion": companion})
        conversation_id = data["conversation"]["id"]
        for m in data["messages"]:
            print(f"{companion}> {m['content']}")
    interactive = sys.stdin.isatty()
    print(f"(conversation {conversation_id}; Ctrl-D to leave)", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        print(f"{companion}> ", end="", flush=True)
        for name, data in client.stream_events(
            f"/api/v1/conversations/{conversation_id}/messages", {"content": line, "stream": True}
        ):
            if name == "delta":
                print(data["content"], end="", flush=True)
            elif name == "error":
                raise ServerError(data["error"]["message"])
        print()


def _local_store(args: argparse.Namespace) -> CompanionStore:
    settings = load_settings(args.config)
    store = CompanionStore(Database(_data_dir(args) / "homefire.db"))
    store.sync_dir(settings.companions_dir)
    return store


def cmd_companion_list(args: argparse.Namespace) -> None:
    url = args.url or running_url(_data_dir(args))
    rows = Client(url).request("GET", "/api/v1/companions") if url else [
        c.model_dump() for c in _local_store(args).list()]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for c in rows:
        print(f"{c['id']:<20} {c['name']:<20} {c['personality'][:40]}")


def cmd_companion_show(args: argparse.Namespace) -> None:
    url = args.url or running_url(_data_dir(args))
    if url:
        data = Client(url).request("GET", f"/api/v1/companions/{args.id}")
    else:
        store = _local_store(args)
        companion = store.get(args.id)
        if companion is None:
            raise UsageError(f"no companion named {args.id!r}; known companions: {', '.join(store.ids())}")
        data = companion.model_dump()
    print(json.dumps(data, ensure_ascii=False, indent=2))


def cmd_companion_import(args: argparse.Namespace) -> None:
    path: Path = args.file
    try:
        content = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    url = args.url or running_url(_data_dir(args))
    if url:
        params = {"filename": path.name, "replace": str(args.replace).lower()}
        data = Client(url).request("POST", "/api/v1/companions/import", content=content, params=params)
    else:
        companion = parse_card(content, str(path))
        store = _local_store(args)
        origin = store.origin(companion.id)
        if origin and not args.replace:
            raise UsageError(f"{path}: a companion with id {companion.id!r} exists; use --replace")
        if origin and origin[0] == "config":
            raise UsageError(f"{path}: {companion.id!r} is defined in {origin[1]}; edit that file")
        store.put(companion, "card", str(path))
        data = companion.model_dump()
    print(f"imported {data['name']!r} as {data['id']!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="homefire", description="A self-hosted AI companion server: your model, your history.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="data directory (default: $HOMEFIRE_DATA_DIR "
                        "or ~/.local/share/homefire)")
    common.add_argument("--config", type=Path, help="settings YAML (see configs/homefire.yaml)")
    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("--url", help="server URL (default: the server running on --data-dir)")

    p = sub.add_parser("serve", parents=[common], help="run the companion server",
                       description="Run the server: it prepares the model, starts vLLM as a private "
                       "child process and serves the OpenAI-compatible and native APIs.")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; others need HOMEFIRE_API_KEY)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks a free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", parents=[remote], help="chat with a companion in the terminal",
                       description="Chat in the terminal with a companion of a running server; "
                       "replies stream as they are written and the server keeps the history.")
    p.add_argument("companion", nargs="?", help="companion id (default: ember)")
    p.add_argument("--conversation", help="continue this conversation id instead of starting one")
    p.set_defaults(func=cmd_chat)

    companion = sub.add_parser("companion", help="list, show and import companions",
                               description="Manage companions, through the running server if there "
                               "is one, else directly in the data directory.")
    csub = companion.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = csub.add_parser("list", parents=[remote], help="list companions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_companion_list)
    p = csub.add_parser("show", parents=[remote], help="show one companion's card as JSON")
    p.add_argument("id", help="companion id")
    p.set_defaults(func=cmd_companion_show)
    p = csub.add_parser("import-card", parents=[remote], help="import a Character Card (.json or .png)",
                        description="Import a Character Card V1/V2/V3 from a .json file or a .png "
                        "with the card in its 'chara' or 'ccv3' text chunk.")
    p.add_argument("file", type=Path, help="the card file")
    p.add_argument("--replace", action="store_true", help="replace a companion with the same id")
    p.set_defaults(func=cmd_companion_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, CompanionError, ServerError) as err:
        print(f"homefire: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
