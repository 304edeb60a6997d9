#!/usr/bin/env python3
"""Helpers for scripts/bench (loopback only).

  bench-helper.py free-port
      print a free TCP port on 127.0.0.1
  bench-helper.py rss OUT PID...
      every 50 ms, sum VmRSS over the process trees rooted at PID... (the processes and all
      their descendants); write the peak (kB) and the sample count to OUT after every sample
      until killed
  bench-helper.py relay LISTEN_PORT TARGET_PORT LOG
      a TCP relay 127.0.0.1:LISTEN_PORT -> 127.0.0.1:TARGET_PORT that appends
      "<bytes client->server> <bytes server->client>" to LOG for every connection once both
      directions are closed; LOG.open holds the number of connections still open
  bench-helper.py pkt-refs FILE
      print the ref lines of a pkt-line response (v2 ls-refs or v0 info/refs), sorted, with
      capabilities (after NUL) removed
  bench-helper.py ls-refs-body FILE
      write the body `git fetch` (protocol v2) sends for its ref listing
  bench-helper.py fetch-body FILE ARGS...
      write a v2 fetch body (wants from stdin, then ARGS lines), as git sends it without progress
  bench-helper.py pack-size FILE
      print the bytes of pack data in a v2 fetch answer
  bench-helper.py github-push URL SECRET CLONE_URL REF
      POST a GitHub `push` webhook for CLONE_URL and REF to URL, signed with SECRET
      (X-Hub-Signature-256); print the HTTP status
  bench-helper.py median
      median of the numbers on stdin
  bench-helper.py table TSV
      print the markdown results table for the rows in TSV (fixture, shape, metric, unit,
      kind, proxy, git, notes, and the proxy's value before maintenance if measured)
"""

import asyncio
import os
import signal
import socket
import statistics
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def rss(out, roots):
    roots = {int(p) for p in roots}
    peak = 0
    samples = 0

    def stop(*_):
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        parent = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # the command name may contain spaces and parentheses: fields start after the last ')'
            fields = stat[stat.rindex(b")") + 2:].split()
            parent[int(entry)] = int(fields[1])
        members = set()
        for pid in parent:
            p, hops = pid, 0
            while p > 1 and hops < 64:
                if p in roots:
                    members.add(pid)
                    break
                p = parent.get(p, 0)
                hops += 1
        total = 0
        for pid in members:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                            break
            except OSError:
                pass
        samples += 1
        if total > peak:
            peak = total
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{peak} {samples}\n")
        os.replace(tmp, out)
        time.sleep(0.05)


def relay(listen_port, target_port, log):
    state = {"open": 0}

    def set_open(delta):
        state["open"] += delta
        with open(log + ".open.tmp", "w") as f:
            f.write(f"{state['open']}\n")
        os.replace(log + ".open.tmp", log + ".open")

    async def pipe(src, dst):
        n = 0
        try:
            while True:
                data = await src.read(1 << 16)
                if not data:
                    break
                n += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                pass
        return n

    async def handle(reader, writer):
        set_open(1)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            set_open(-1)
            return
        up, down = await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            try:
                w.close()
            except (ConnectionError, OSError):
                pass
        with open(log, "a") as f:
            f.write(f"{up} {down}\n")
        set_open(-1)

    async def serve():
        set_open(0)
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def pkt_lines(data):
    i = 0
    while i + 4 <= len(data):
        n = int(data[i:i + 4], 16)
        if n < 4:
            i += 4
            yield None
            continue
        yield data[i + 4:i + n]
        i += n


def pkt_refs(path):
    with open(path, "rb") as f:
        data = f.read()
    refs = []
    for line in pkt_lines(data):
        if line is None or line.startswith(b"#"):
            continue
        line = line.split(b"\0", 1)[0].rstrip(b"\n")
        refs.append(line.decode("utf-8", "replace"))
    for r in sorted(refs):
        print(r)


def pkt(s):
    b = s.encode()
    return b"%04x" % (len(b) + 4) + b


def ls_refs_body(path):
    import subprocess
    version = subprocess.run(["git", "version"], capture_output=True, text=True).stdout.split()[-1]
    body = (pkt("command=ls-refs\n") + pkt(f"agent=git/{version}\n") + pkt("object-format=sha1\n") + b"0001"
            + pkt("peel\n") + pkt("symrefs\n") + pkt("unborn\n") + pkt("ref-prefix HEAD\n")
            + pkt("ref-prefix refs/heads/\n") + pkt("ref-prefix refs/tags/\n") + b"0000")
    with open(path, "wb") as f:
        f.write(body)


def fetch_body(path, *args):
    """A v2 fetch as git sends it without progress: `want` lines from stdin, then ARGS lines."""
    import subprocess
    version = subprocess.run(["git", "version"], capture_output=True, text=True).stdout.split()[-1]
    wants = sorted(set(sys.stdin.read().split()))
    body = (pkt("command=fetch\n") + pkt(f"agent=git/{version}\n") + pkt("object-format=sha1\n") + b"0001"
            + pkt("thin-pack\n") + pkt("no-progress\n") + pkt("ofs-delta\n")
            + b"".join(pkt(a + "\n") for a in args)
            + b"".join(pkt(f"want {w}\n") for w in wants) + pkt("done\n") + b"0000")
    with open(path, "wb") as f:
        f.write(body)


def pack_size(path):
    """The bytes of pack data in a v2 fetch answer (band 1 after `packfile`); fails without one."""
    data = open(path, "rb").read()
    total, in_pack, i = 0, False, 0
    while i + 4 <= len(data):
        n = int(data[i:i + 4], 16)
        if n < 4:
            i += 4
            continue
        line = data[i + 4:i + n]
        if in_pack and line[:1] == b"\x01":
            total += n - 5
        elif line == b"packfile\n":
            in_pack = True
        i += n
    if not in_pack or total < 32:
        sys.exit(f"{path}: no pack in the answer: {data[:200]!r}")
    print(total)


def github_push(url, secret, clone_url, ref):
    import hashlib
    import hmac
    import json
    import urllib.error
    import urllib.request
    body = json.dumps({"ref": ref, "repository": {"full_name": "bench", "clone_url": clone_url}}).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signature,
    })
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            print(answer.status)
    except urllib.error.HTTPError as e:
        print(e.code)


def median():
    values = [float(x) for x in sys.stdin.read().split()]
    print("%.4f" % statistics.median(values))


def fmt(value, unit):
    if value in ("", "-"):
        return "-"
    if unit == "text":
        return value
    v = float(value)
    if unit == "s":
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB"):
            if abs(v) < 1024 or u == "GiB":
                return f"{v:.0f} {u}" if u == "B" else f"{v:.1f} {u}"
            v /= 1024
    if unit == "kB":
        return f"{v / 1024:.0f} MiB"
    if unit in ("req/s", "fetch/s", "clone/s"):
        return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.2f} {unit}"
    return f"{v:g} {unit}"


def compare(proxy, git, kind):
    """The ratio proxy/git and who is better, or ("-", "-")."""
    if kind == "text" or proxy in ("", "-") or git in ("", "-"):
        return "-", "-"
    if float(git) <= 0 or float(proxy) <= 0:
        return "-", "-"
    r = float(proxy) / float(git)
    higher_is_better = kind == "rate"
    if abs(r - 1) < 0.005:
        better = "tie"
    elif (r > 1) == higher_is_better:
        better = f"proxy {max(r, 1 / r):.2f}x"
    else:
        better = f"git {max(r, 1 / r):.2f}x"
    return f"{r:.2f}", better


def table(path):
    # columns: fixture, shape, metric, unit, kind (time|rate|size|text), proxy, git, notes,
    # and the proxy's value on the mirror before maintenance (empty when not measured)
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append((line.rstrip("\n").split("\t") + [""] * 9)[:9])
    window = any(r[8] not in ("", "-") for r in rows)
    head = "| fixture | shape | metric | proxy | git | ratio proxy/git | better |"
    rule = "|---|---|---|---|---|---|---|"
    if window:
        head += " proxy before maintenance | ratio before/git |"
        rule += "---|---|"
    print(head + " notes |")
    print(rule + "---|")
    for fixture, shape, metric, unit, kind, proxy, git, notes, before in rows:
        ratio, better = compare(proxy, git, kind)
        cells = [fixture, shape, metric, fmt(proxy, unit), fmt(git, unit), ratio, better]
        if window:
            cells += [fmt(before, unit), compare(before, git, kind)[0]]
        print("| " + " | ".join(cells + [notes]) + " |")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "rss":
        rss(args[0], args[1:])
    elif cmd == "relay":
        relay(int(args[0]), int(args[1]), args[2])
    elif cmd == "pkt-refs":
        pkt_refs(args[0])
    elif cmd == "ls-refs-body":
        ls_refs_body(args[0])
    elif cmd == "fetch-body":
        fetch_body(args[0], *args[1:])
    elif cmd == "pack-size":
        pack_size(args[0])
    elif cmd == "github-push":
        github_push(*args[:4])
    elif cmd == "median":
        median()
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
