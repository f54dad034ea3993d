#!/usr/bin/env python3
"""A loopback adapter in front of fake-gcs-server for the GCS tests.

object_store's GCS client speaks Google's XML API for objects: a plain
`PUT /<bucket>/<object>` uploads, with `x-goog-if-generation-match: 0` for
a create-only put (cairn's manifest commit). fake-gcs-server answers the
rest of that API (GET with ranges, HEAD, DELETE, the `list-type=2`
listing with prefixes and delimiters), but refuses a plain PUT ("invalid
uploadType") and ignores generation preconditions on every upload path.
This adapter forwards every request unchanged except:

- `PUT /<bucket>/<object>`: stored through fake-gcs-server's JSON media
  upload; `x-goog-if-generation-match` is checked first, under one lock
  for all puts, and a failed check is answered as GCS does: HTTP 412
  `PreconditionFailed`.
- a request on a bucket that does not exist (fake-gcs-server answers a
  listing with HTTP 500 "no bucket named ...", an object GET with a bare
  404) is answered as GCS does: HTTP 404 `NoSuchBucket`.

Usage: gcs-xml-adapter.py LISTEN_PORT UPSTREAM_PORT (both on 127.0.0.1).
"""

import http.client
import http.server
import json
import sys
import threading
import urllib.parse

UPSTREAM = ("127.0.0.1", int(sys.argv[2]))
PUT_LOCK = threading.Lock()
HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def xml_error(code, message):
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    ).encode()


def upstream(method, path, headers=None, body=None):
    conn = http.client.HTTPConnection(*UPSTREAM, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def bucket_exists(path):
    bucket = urllib.parse.urlsplit(path).path.lstrip("/").split("/", 1)[0]
    if not bucket or bucket in ("storage", "upload", "download"):
        return True
    status, _, _ = upstream("GET", "/storage/v1/b/" + urllib.parse.quote(urllib.parse.unquote(bucket)))
    return status != 404


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP:
                self.send_header(k, v)
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        else:
            length = str(len(body))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def forward(self):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        status, rh, body = upstream(self.command, self.path, headers, self.body())
        if status == 404 and self.command == "GET" and not bucket_exists(self.path):
            status = 500
            body = b"no bucket named"
        if status == 500 and b"no bucket named" in body:
            status, rh, body = 404, [("Content-Type", "application/xml")], xml_error(
                "NoSuchBucket", "The specified bucket does not exist."
            )
        self.reply(status, rh, body)

    def do_GET(self):
        self.forward()

    def do_HEAD(self):
        self.forward()

    def do_DELETE(self):
        self.forward()

    def do_POST(self):
        self.forward()

    def do_PUT(self):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.lstrip("/").split("/", 1)
        if url.query or len(parts) < 2 or parts[0] in ("storage", "upload", "download"):
            return self.forward()
        bucket, name = urllib.parse.unquote(parts[0]), urllib.parse.unquote(parts[1])
        data = self.body()
        cond = self.headers.get("x-goog-if-generation-match")
        with PUT_LOCK:
            if cond is not None:
                status, rh, _ = upstream("HEAD", url.path)
                generation = dict((k.lower(), v) for k, v in rh).get("x-goog-generation")
                exists = status == 200
                ok = (not exists) if cond == "0" else (exists and generation == cond)
                if not ok:
                    return self.reply(
                        412,
                        [("Content-Type", "application/xml")],
                        xml_error(
                            "PreconditionFailed",
                            "At least one of the pre-conditions you specified did not hold.",
                        ),
                    )
            q = urllib.parse.urlencode({"uploadType": "media", "name": name})
            ctype = self.headers.get("Content-Type", "application/octet-stream")
            status, _, body = upstream(
                "POST",
                f"/upload/storage/v1/b/{urllib.parse.quote(bucket)}/o?{q}",
                {"Content-Type": ctype},
                data,
            )
        if status == 404:
            return self.reply(
                404,
                [("Content-Type", "application/xml")],
                xml_error("NoSuchBucket", "The specified bucket does not exist."),
            )
        if status != 200:
            return self.reply(status, [], body)
        obj = json.loads(body)
        self.reply(
            200,
            [("ETag", '"%s"' % obj.get("etag", "")), ("x-goog-generation", obj.get("generation", ""))],
            b"",
        )


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
