"""`homefire user`: accounts on the data directory (with or without a running server)."""

from __future__ import annotations

import argparse
import json
import os
import time

from serve.cli_base import UsageError, resolve_data_dir
from store.db import Database
from store.users import DEFAULT_USER_NAME, LOCAL, Users, key_file, local_key, write_key


def _users(args: argparse.Namespace) -> Users:
    return Users(Database(resolve_data_dir(args) / "homefire.db"))


def _print_key(args: argparse.Namespace, name: str, key: str, what: str) -> None:
    if args.json:
        print(json.dumps({"name": name, "api_key": key}))
    else:
        print(f"{what}. Its API key, shown only this once (Homefire keeps only a hash):\n{key}")


def cmd_user(args: argparse.Namespace) -> None:
    from store.users import UserError

    users = _users(args)
    try:
        if args.action == "add":
            key = users.add(args.name, args.admin, args.display_name)
            _print_key(args, args.name, key, f"created {'admin ' if args.admin else ''}user {args.name}")
        elif args.action == "rotate":
            key = users.rotate(args.name)
            if args.name == LOCAL:
                write_key(key_file(resolve_data_dir(args)), key)
                if os.environ.get("HOMEFIRE_API_KEY"):
                    print("note: HOMEFIRE_API_KEY is set; the server uses it instead at its next start")
            _print_key(args, args.name, key, f"{args.name} has a new key; the old one no longer works")
        elif args.action == "display-name":
            if args.name == LOCAL:   # the owner's row is made at the server's first start; maybe not yet
                users.ensure_local(local_key(resolve_data_dir(args)))
            shown = users.set_display_name(args.name, args.display_name)
            print(f"companions now call {args.name} {shown!r} (memories already made keep their name)")
        elif args.action == "revoke":
            users.revoke(args.name)
            print(f"{args.name}'s key no longer works; their data is kept (rotate gives a new key)")
        elif args.action == "list":
            found = users.list()
            if args.json:
                print(json.dumps([u.model_dump() for u in found], indent=2))
            for u in [] if args.json else found:
                since = time.strftime("%Y-%m-%d", time.localtime(u.created_at))
                state = "revoked" if u.revoked_at else "active"
                print(f"{u.name:<32} {'admin' if u.admin else 'user':<6} {state:<8} since {since}  "
                      f"called {u.display_name or DEFAULT_USER_NAME!r}")
        elif args.action == "key":
            print(local_key(resolve_data_dir(args)))
    except UserError as err:
        raise UsageError(str(err)) from err


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    user = sub.add_parser(
        "user", help="accounts: add, list, name, revoke and rotate API keys",
        description="Accounts of a shared server. Each user has an API key (sent as 'Authorization: "
        "Bearer KEY') and their own conversations and memories, which nobody else can read, admins "
        "included. Admins also manage shared companions. The local owner 'local' is an admin whose "
        "key is in the data directory's api_key file. Changes apply at once, also to a running server.")
    usub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = usub.add_parser("add", parents=[common], help="create a user and print their API key once")
    p.add_argument("name", help="user name: lower-case letters, digits, '_' and single '-'")
    p.add_argument("--admin", action="store_true", help="may manage shared companions")
    p.add_argument("--display-name", metavar="NAME", help="what companions call them ({{user}} in cards, "
                   "their lines in memories); default 'User'")
    p.add_argument("--json", action="store_true", help='print {"name": ..., "api_key": ...}')
    usub.add_parser("list", parents=[common], help="users, their role and whether they are revoked") \
        .add_argument("--json", action="store_true", help="print JSON")
    p = usub.add_parser("display-name", parents=[common], help="set what companions call a user",
                        description="What companions call the user from now on: {{user}} in companion "
                        "cards and greetings, and the user's lines in new memories (default 'User'). "
                        "Memories already made keep the name they have.")
    p.add_argument("name", help="user name ('local' is the server's owner)")
    p.add_argument("display_name", metavar="DISPLAY_NAME", help="e.g. 'Sam': 1 to 40 characters, one line")
    p = usub.add_parser("revoke", parents=[common], help="stop a user's key working (their data stays)")
    p.add_argument("name", help="user name")
    p = usub.add_parser("rotate", parents=[common], help="give a user a new key; the old one stops working")
    p.add_argument("name", help="user name")
    p.add_argument("--json", action="store_true", help='print {"name": ..., "api_key": ...}')
    usub.add_parser("key", parents=[common], help="print the local owner's key, for clients on this "
                    "machine (e.g. OPENAI_API_KEY=$(homefire user key))")
    for action_parser in usub.choices.values():
        action_parser.set_defaults(func=cmd_user)
