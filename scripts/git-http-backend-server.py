#!/usr/bin/env python3
"""A minimal CGI front for `git http-backend`, the stock-git baseline of scripts/bench.

Usage: git-http-backend-server.py PROJECT_ROOT PORT

Serves every repository under PROJECT_ROOT (GIT_HTTP_EXPORT_ALL) on 127.0.0.1:PORT. Request
bodies (Content-Length or chunked) are passed on stdin; the CGI output is streamed back with
the status from its `Status:` header. Responses end by closing the connection (HTTP/1.0).

Optional, from the environment (scripts/soak's hostile shapes use them):
  BACKEND_AUTH=/prefix=user:password,...   repositories under /prefix need Basic auth (else 401)
  BACKEND_HIDE=/prefix=PATTERN=user:password,...
                                           requests without those credentials do not see the
                                           refs PATTERN names (uploadpack.hideRefs), as on a
                                           server with per-ref read rights
  BACKEND_LOG=1                            one line per request on stdout: METHOD PATH STATUS
                                           auth|anonymous
  BACKEND_LFS=DIR                          answer the Git LFS batch API (downloads) for the
                                           objects in DIR (files named by OID), with links to
                                           /_storage/{oid} on this server, as GitHub's answers
                                           point to its storage host; GET /_storage/stats
                                           gives the storage bytes and downloads served so far
                                           (scripts/bench-lfs)
"""

import base64
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse


def rules(name):
    """[(prefix, [fields...])] from an environment variable of comma-separated prefix=... rules."""
    out = []
    for rule in filter(None, os.environ.get(name, "").split(",")):
        prefix, *fields = rule.split("=")
        out.append((prefix, fields))
    return out


AUTH = rules("BACKEND_AUTH")
HIDE = rules("BACKEND_HIDE")
LOG = os.environ.get("BACKEND_LOG") == "1"
LOG_LOCK = threading.Lock()
LFS = os.environ.get("BACKEND_LFS")
STORAGE = {"bytes": 0, "downloads": 0}


def basic(user_password):
    return "Basic " + base64.b64encode(user_password.encode()).decode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    root = ""

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        if LFS and self.path.startswith("/_storage/"):
            self.storage(self.path[len("/_storage/"):].partition("?")[0])
            return
        self.run_backend(b"")

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self.read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if LFS and self.path.partition("?")[0].endswith("/info/lfs/objects/batch"):
            self.lfs_batch(body)
            return
        self.run_backend(body)

    def lfs_batch(self, body):
        request = json.loads(body)
        port = self.server.server_address[1]
        objects = []
        for o in request.get("objects", []):
            path = os.path.join(LFS, os.path.basename(o["oid"]))
            if os.path.isfile(path):
                objects.append({"oid": o["oid"], "size": o["size"], "actions": {"download": {
                    "href": f"http://127.0.0.1:{port}/_storage/{o['oid']}?sig=bench",
                    "header": {"X-Storage": "bench"}, "expires_in": 3600}}})
            else:
                objects.append({"oid": o["oid"], "size": o["size"],
                                "error": {"code": 404, "message": "Object does not exist"}})
        answer = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def storage(self, oid):
        if oid == "stats":
            with LOG_LOCK:
                answer = json.dumps(STORAGE).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(answer)
            return
        path = os.path.join(LFS, os.path.basename(oid))
        if not os.path.isfile(path):
            self.send_response(404)
            self.end_headers()
            return
        size = os.path.getsize(path)
        with LOG_LOCK:
            STORAGE["downloads"] += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                with LOG_LOCK:
                    STORAGE["bytes"] += len(chunk)

    def read_chunked(self):
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def logged(self, path, status):
        if LOG:
            who = "auth" if self.headers.get("Authorization") else "anonymous"
            with LOG_LOCK:
                print(f"{self.command} {path} {status} {who}", flush=True)

    def run_backend(self, body):
        path, _, query = self.path.partition("?")
        given = self.headers.get("Authorization")
        for prefix, (user_password,) in AUTH:
            if path.startswith(prefix) and given != basic(user_password):
                self.logged(path, 401)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="upstream"')
                self.end_headers()
                self.wfile.write(b"credentials required\n")
                return
        hidden = [pattern for prefix, (pattern, user_password) in HIDE
                  if path.startswith(prefix) and given != basic(user_password)]
        env = dict(os.environ)
        for i, pattern in enumerate(hidden):
            env[f"GIT_CONFIG_KEY_{i}"] = "uploadpack.hideRefs"
            env[f"GIT_CONFIG_VALUE_{i}"] = pattern
        if hidden:
            env["GIT_CONFIG_COUNT"] = str(len(hidden))
        env.update({
            "GIT_PROJECT_ROOT": self.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": self.request_version,
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(self.server.server_address[1]),
            "REMOTE_ADDR": self.client_address[0],
            "REQUEST_METHOD": self.command,
            "PATH_INFO": urllib.parse.unquote(path),
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
        })
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        proc = subprocess.Popen(["git", "http-backend"], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, bufsize=0)

        def feed():
            try:
                proc.stdin.write(body)
            except BrokenPipeError:
                pass
            finally:
                proc.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        status, headers = 200, []
        while True:
            line = proc.stdout.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            else:
                headers.append((name, value.strip()))
        self.logged(path, status)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        try:
            shutil.copyfileobj(proc.stdout, self.wfile, 65536)
        except (BrokenPipeError, ConnectionResetError):
            proc.kill()
        proc.wait()
        feeder.join()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    Handler.root = os.path.abspath(sys.argv[1])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
