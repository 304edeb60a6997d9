#!/usr/bin/env python3
"""Drive a non-git Git client library against a URL, for the interoperability tests.

Usage:
  client.py CLIENT clone URL DEST [--bare] [--depth N] [--branch B] [--protocol V]
  client.py CLIENT fetch DEST [--depth N] [--protocol V]
  client.py CLIENT ls-remote URL [--protocol V]

CLIENT is `dulwich` or `pygit2` (libgit2). Exits non-zero with the library's error on failure;
`ls-remote` prints `<oid> <ref>` lines sorted by ref.
"""

import argparse
import sys


def dulwich_main(args):
    from dulwich import porcelain

    kwargs = {}
    if args.protocol is not None:
        kwargs["protocol_version"] = args.protocol
    if args.op == "clone":
        porcelain.clone(
            args.target,
            args.dest,
            bare=args.bare,
            depth=args.depth,
            branch=args.branch,
            errstream=sys.stderr.buffer,
            **kwargs,
        ).close()
    elif args.op == "fetch":
        porcelain.fetch(args.target, "origin", depth=args.depth, errstream=sys.stderr.buffer, quiet=True)
    elif args.op == "ls-remote":
        result = porcelain.ls_remote(args.target)
        refs = getattr(result, "refs", result)
        for name in sorted(refs):
            print(f"{refs[name].decode()} {name.decode()}")


def pygit2_main(args):
    import pygit2

    if args.op == "clone":
        pygit2.clone_repository(
            args.target,
            args.dest,
            bare=args.bare,
            checkout_branch=args.branch,
            depth=args.depth or 0,
        )
    elif args.op == "fetch":
        repo = pygit2.Repository(args.target)
        repo.remotes["origin"].fetch(depth=args.depth or 0)
    elif args.op == "ls-remote":
        repo = pygit2.Repository(pygit2.init_repository(args.scratch, bare=True).path)
        remote = repo.remotes.create_anonymous(args.target)
        heads = remote.list_heads() if hasattr(remote, "list_heads") else remote.ls_remotes()
        for head in sorted(heads, key=lambda h: h["name"] if isinstance(h, dict) else h.name):
            name = head["name"] if isinstance(head, dict) else head.name
            oid = head["oid"] if isinstance(head, dict) else head.oid
            if name == "HEAD" or oid is None:
                continue
            print(f"{oid} {name}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=["dulwich", "pygit2"])
    parser.add_argument("op", choices=["clone", "fetch", "ls-remote"])
    parser.add_argument("target")
    parser.add_argument("dest", nargs="?")
    parser.add_argument("--bare", action="store_true")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--branch")
    parser.add_argument("--protocol", type=int)
    parser.add_argument("--scratch", help="a scratch directory (pygit2 ls-remote)")
    args = parser.parse_args()
    {"dulwich": dulwich_main, "pygit2": pygit2_main}[args.client](args)


if __name__ == "__main__":
    main()
