"""The `homefire` command: serve, chat, and manage companions.

Run `homefire --help`, or `homefire COMMAND --help` for one command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from finetune.config import FinetuneError
from memory.imports import ImportFailed
from serve import cli_bundle, cli_drift, cli_imports, cli_users, cli_voice
from serve.bundle import BundleError
from serve.cli_base import UsageError, client, hold_lock, resolve_data_dir
from serve.client import Client, ServerError
from serve.config import ConfigError, check_exposure, load_settings
from serve.sse import DELTA
from store.adapters import AdapterError
from store.companions import CompanionError, load_dir
from store.lorebook import Lorebook, unsupported
from store.run import announce, withdraw


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from serve.app import create_app
    from serve.homefire import quiet_libraries

    settings = load_settings(args.config)
    settings.host = args.host or settings.host
    settings.port = settings.port if args.port is None else args.port
    check_exposure(settings)
    load_dir(settings.companions_dir)  # fail here, with the file named, not mid-start-up
    if settings.finetune.config:   # the training jobs' settings, named at start and not at a job's
        from finetune.config import load_config

        load_config(settings.finetune.config)
    data_dir = resolve_data_dir(args)
    lock = hold_lock(data_dir)  # noqa: F841 (held until the process exits)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        sock = socket.create_server((settings.host, settings.port), family=family)
    except OSError as err:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {err.strerror}") from err
    port = sock.getsockname()[1]
    host = f"[{settings.host}]" if family == socket.AF_INET6 else settings.host
    url = f"http://{host}:{port}"
    announce(data_dir, url)
    logging.getLogger("homefire").info("listening on %s (data in %s)", url, data_dir)
    app = create_app(settings, data_dir, url)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        withdraw(data_dir)


def cmd_chat(args: argparse.Namespace) -> None:
    """A conversation in the terminal: with the running server, else with Homefire and its engine
    started in this command (serve/in_process.py)."""
    companion = args.companion or load_settings(args.config).default_companion
    with client(args, "engine") as talk:
        _chat(args, talk, companion)


def _chat(args: argparse.Namespace, talk: Client, companion: str) -> None:
    if args.conversation:
        data = talk.request("GET", f"/api/v1/conversations/{args.conversation}")
        conversation_id = data["conversation"]["id"]
        for m in data["messages"][-6:]:
            print(f"{'you' if m['role'] == 'user' else companion}> {m['content']}")
    else:
        data = talk.request("POST", "/api/v1/conversations", json={"companion": companion})
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
        for name, data in talk.stream_events(
            f"/api/v1/conversations/{conversation_id}/messages", {"content": line, "stream": True}
        ):
            if name == DELTA:
                print(data["content"], end="", flush=True)
        print()


def cmd_companion_list(args: argparse.Namespace) -> None:
    with client(args) as here:
        rows = here.request("GET", "/api/v1/companions")
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    for c in rows:
        print(f"{c['id']:<20} {c['name']:<20} {c['personality'][:40]}")


def cmd_companion_show(args: argparse.Namespace) -> None:
    with client(args) as here:
        data = here.request("GET", f"/api/v1/companions/{args.id}")
    print(json.dumps(data, ensure_ascii=False, indent=2))
    if data.get("character_book") is not None:   # for people: stdout stays the card's JSON
        book = Lorebook.model_validate(data["character_book"])
        enabled = sum(entry.enabled for entry in book.entries)
        print(f"lorebook {book.name or '(untitled)'!r}: {len(book.entries)} entries, {enabled} enabled",
              file=sys.stderr)
        ignored = unsupported(book)
        if ignored:
            print("decorators kept but not acted on:", *(f"  {line}" for line in ignored), sep="\n",
                  file=sys.stderr)


def cmd_companion_import(args: argparse.Namespace) -> None:
    path: Path = args.file
    try:
        content = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    params = {"filename": path.name, "replace": str(args.replace).lower()}
    with client(args) as here:
        data = here.request("POST", "/api/v1/companions/import", content=content, params=params)
    print(f"imported {data['name']!r} as {data['id']!r}")


def cmd_memory(args: argparse.Namespace) -> None:
    """Through the running server if there is one, else through the same application here."""
    action = args.action
    with client(args, "memory") as here:
        calls = {
            "list": lambda: here.request("GET", f"/api/v1/companions/{args.companion}/memories",
                                         params={"limit": args.limit, "offset": args.offset}),
            "search": lambda: here.request("GET", f"/api/v1/companions/{args.companion}/memories/search",
                                           params={"q": args.query, "k": args.k}),
            "add": lambda: here.request("POST", f"/api/v1/companions/{args.companion}/memories",
                                        json={"text": args.text, "pinned": args.pin}),
            "edit": lambda: here.request("PATCH", f"/api/v1/memories/{args.id}", json={"text": args.text}),
            "pin": lambda: here.request("PATCH", f"/api/v1/memories/{args.id}",
                                        json={"pinned": not args.unpin}),
            "delete": lambda: here.request("DELETE", f"/api/v1/memories/{args.id}"),
            "forget-conversation": lambda: here.request("DELETE", f"/api/v1/conversations/{args.id}"),
            "rebuild": lambda: here.request("POST", "/api/v1/memories/rebuild"),
            "recall": lambda: here.request("GET", f"/api/v1/companions/{args.companion}/memories/recall",
                                           params={"q": args.text}),
            "find-tasks": lambda: here.request("GET",
                                               f"/api/v1/companions/{args.companion}/task-conversations"),
            "summary": lambda: (
                here.request("PUT", f"/api/v1/conversations/{args.id}/summary", json={"text": args.set})
                if args.set is not None else here.request("GET", f"/api/v1/conversations/{args.id}/summary")),
        }
        result = calls[action]()
        if action == "find-tasks" and args.forget:
            for found in result:
                here.request("DELETE", f"/api/v1/conversations/{found['id']}")
    _print_memory_result(action, result, args)


def because(why: dict) -> str:
    """A recalled memory's `why`, in words."""
    parts = [f"{why['matched']} matched ({why['similarity']:.2f})"]
    if why.get("window"):
        parts.append(why["window"])
    if why.get("said_again"):
        parts.append("said again elsewhere, so it counts less in a reply")
    if why.get("reranked") is not None:
        parts.append(f"ordered by the reranker ({why['reranked']:.2f})")
    return "; ".join(parts)


def _print_memory_result(action: str, result: object, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, ensure_ascii=False, indent=2))
    elif action in ("list", "search", "recall"):
        for m in result:
            when = time.strftime("%Y-%m-%d", time.localtime(m["created_at"]))
            flag = "*" if m["pinned"] else " "
            score = f" {m['score']:.2f}" if "score" in m else ""
            where = (m["conversation_id"] or "-")[:8]   # the conversation it was said in
            said = " / ".join(m["text"].splitlines())   # both speakers of an exchange
            print(f"{m['id']:>6}{flag} {when} {where:<8} {m['kind']:<8}{score} {said[:100]}")
            if action == "recall":
                print(f"{'':>16}why: {because(m['why'])}")
    elif action in ("delete", "forget-conversation"):
        print("deleted")
    elif action == "summary":
        _print_summary(result.get("summary", result) if "folding" in result else result,
                       result.get("folding", False))
    elif action == "rebuild":
        print(f"rebuilt the index of {result['memories']} memories")
    elif action == "find-tasks":
        for t in result:
            when = time.strftime("%Y-%m-%d", time.localtime(t["created_at"]))
            print(f"{t['id']}  {when}  {t['client']:<12} {t['first_message'].splitlines()[0][:70]}")
        if args.forget:
            print(f"forgot {len(result)} conversation(s), with their memories")
        else:
            print(f"{len(result)} conversation(s) began with a client's background task"
                  + ("; add --forget to delete them with their memories" if result else ""))
    else:
        print(f"memory {result['id']}: {result['text']}" + (" (pinned)" if result["pinned"] else ""))


def _print_summary(summary: dict | None, folding: bool) -> None:
    pending = " (a fold of more turns is being written)" if folding else ""
    if summary is None:
        print("no summary yet: the conversation still fits the context, or its first fold is being "
              f"written{pending}")
        return
    edited = ", in your words" if summary["edited"] else ""
    print(f"what the companion keeps in mind from the conversation's first {summary['turns']} messages "
          f"(ids {summary['first_message_id']} to {summary['through_message_id']}{edited}){pending}:")
    print(summary["text"])


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
    p.add_argument("--host", help="address to listen on (default 127.0.0.1); every request needs an API key")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0 picks a free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", parents=[remote], help="chat with a companion in the terminal",
                       description="Chat in the terminal with a companion: through the running "
                       "server, or, when none runs on the data directory, through Homefire and its engine "
                       "started in this command for as long as the chat lasts (a minute to start). Replies "
                       "stream as they are written, and the history is kept either way.")
    p.add_argument("companion", nargs="?", help="companion id (default: the settings' default_companion, "
                   "ember unless changed)")
    p.add_argument("--conversation", help="continue this conversation id instead of starting one")
    p.set_defaults(func=cmd_chat)

    companion = sub.add_parser("companion", help="list, show, import and export companions",
                               description="Manage companions, through the running server if there "
                               "is one, else through the same application run here on the data directory.")
    csub = companion.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = csub.add_parser("list", parents=[remote], help="list companions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_companion_list)
    p = csub.add_parser("show", parents=[remote],
                        help="show one companion's card as JSON (its lorebook summed up on stderr)",
                        description="Print the companion's card as JSON. A card with a lorebook also gets, "
                        "on stderr, its entry count and the V3 decorators (@@name) that Homefire keeps "
                        "in the card but does not act on.")
    p.add_argument("id", help="companion id")
    p.set_defaults(func=cmd_companion_show)
    p = csub.add_parser("import-card", parents=[remote], help="import a Character Card (.json or .png)",
                        description="Import a Character Card V1/V2/V3 from a .json file or a .png "
                        "with the card in its 'chara' or 'ccv3' text chunk.")
    p.add_argument("file", type=Path, help="the card file")
    p.add_argument("--replace", action="store_true", help="replace a companion with the same id")
    p.set_defaults(func=cmd_companion_import)

    memory = sub.add_parser("memory", help="see and control what companions remember",
                            description="List, search, add, correct, pin and delete long-term memories, "
                            "through the running server if there is one, else through the same "
                            "application run here on the data directory (under the lock a server takes).")
    msub = memory.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = msub.add_parser("list", parents=[remote], help="list memories, pinned first, newest first")
    p.add_argument("companion", help="companion id")
    p.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many")
    p = msub.add_parser("search", parents=[remote], help="find memories by meaning")
    p.add_argument("companion", help="companion id")
    p.add_argument("query", help="what to look for")
    p.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    p = msub.add_parser("add", parents=[remote], help="add a fact the companion should know")
    p.add_argument("companion", help="companion id")
    p.add_argument("text", help='the fact, e.g. "I am allergic to walnuts"')
    p.add_argument("--pin", action="store_true", help="pin it")
    p = msub.add_parser("edit", parents=[remote], help="correct a memory's text")
    p.add_argument("id", type=int, help="memory id")
    p.add_argument("text", help="the corrected text")
    p = msub.add_parser("pin", parents=[remote], help="pin a memory (or --unpin it)")
    p.add_argument("id", type=int, help="memory id")
    p.add_argument("--unpin", action="store_true", help="unpin instead")
    p = msub.add_parser("delete", parents=[remote], help="delete a memory for good")
    p.add_argument("id", type=int, help="memory id")
    p = msub.add_parser("forget-conversation", parents=[remote],
                        help="delete a conversation with all its messages and memories")
    p.add_argument("id", help="conversation id")
    p = msub.add_parser("recall", parents=[remote], help="show what a reply to TEXT would recall",
                        description="Show exactly the memories a reply to TEXT would place in its prompt "
                        "(through the running server, with the function replies use); stores nothing.")
    p.add_argument("companion", help="companion id")
    p.add_argument("text", help='a message, e.g. "where is my sister\'s wedding?"')
    p = msub.add_parser("find-tasks", parents=[remote],
                        help="find conversations that began with a client's background task",
                        description="List the conversations with a companion whose first message is a "
                        "client's background task (Open WebUI's title, tag and follow-up requests, "
                        "SillyTavern's quiet prompts: the tasks.patterns setting), stored before Homefire "
                        "kept them out; --forget deletes them with their memories.")
    p.add_argument("companion", help="companion id")
    p.add_argument("--forget", action="store_true", help="delete them, with their messages and memories")
    p = msub.add_parser("summary", parents=[remote],
                        help="show or correct what a long conversation keeps in mind from earlier",
                        description="Show the running summary of a conversation: what the companion "
                        "keeps in mind from the turns that no longer fit its context (written by the "
                        "served model as the conversation grows); --set puts it in your own words, and "
                        "the next fold goes on from them.")
    p.add_argument("id", help="conversation id")
    p.add_argument("--set", metavar="TEXT", help="replace the summary's words with TEXT")
    msub.add_parser("rebuild", parents=[remote], help="recreate your memories' vectors from SQLite (an "
                    "index that cannot be read is rebuilt whole, for everyone, at every start)")
    for action_parser in msub.choices.values():
        action_parser.add_argument("--json", action="store_true", help="print JSON")
        action_parser.set_defaults(func=cmd_memory)
    cli_bundle.add_commands(sub, remote, csub, common)
    cli_imports.add_commands(sub, remote)
    cli_voice.add_commands(sub, remote)
    cli_drift.add_commands(sub, remote)
    cli_users.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, ConfigError, CompanionError, ServerError, ImportFailed, FinetuneError, AdapterError,
            BundleError) as err:
        print(f"homefire: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `homefire ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
