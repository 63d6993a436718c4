"""Remote media fetches against a real HTTP server on 127.0.0.1 (loopback only, nothing leaves
the machine): the host is resolved once and the connection goes to the address that was checked
(DNS rebinding), redirects are followed by hand under the same rule, and the size and time limits
hold. Fake host names are answered by a fake resolver; the address rule is the policy's own
``address_allowed`` (the tests allow 127.0.0.1 and nothing else)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minicpmv.serve import media
from minicpmv.serve.errors import APIError
from minicpmv.serve.media import MediaPolicy, fetch_media, is_public_address

LOOPBACK = ipaddress.ip_address("127.0.0.1")
PAYLOAD = b"\x89PNG fake image bytes " * 10


class _Handler(BaseHTTPRequestHandler):
    seen_hosts: list[str] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).seen_hosts.append(self.headers.get("Host", ""))
        path = self.path
        if path == "/img.png":
            self._send(200, PAYLOAD)
        elif path.startswith("/hop/"):
            n = int(path.rsplit("/", 1)[1])
            self._redirect("/img.png" if n == 0 else f"/hop/{n - 1}")
        elif path == "/to-private":
            self._redirect("http://private.test/img.png")
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/big-declared":
            self._send(200, b"x" * 10, length=10**9)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass  # the client gave up
        elif path == "/missing":
            self._send(404, b"no")
        else:
            self._send(500, b"?")

    def _send(self, status: int, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture()
def dns(monkeypatch) -> dict[str, list[str]]:
    """A fake resolver for ``*.test`` names: name -> the answers of successive lookups (the last
    repeats). Every lookup of any name is recorded in ``dns["calls"]``; real names pass through."""
    answers: dict[str, list[str]] = {"media.test": ["127.0.0.1"], "private.test": ["10.1.2.3"], "calls": []}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kw):
        name = host.decode() if isinstance(host, bytes) else str(host)
        answers["calls"].append(name)
        if name.endswith(".test"):
            queue = answers[name]
            ip = queue.pop(0) if len(queue) > 1 else queue[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port or 0)))]
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return answers


def _policy(**kw) -> MediaPolicy:
    kw.setdefault("timeout_s", 5.0)
    return MediaPolicy(allow_remote=True, address_allowed=lambda ip: ip == LOOPBACK, **kw)


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    return asyncio.run(fetch_media(url, policy))


def _refused(url: str, policy: MediaPolicy, code: str) -> APIError:
    with pytest.raises(APIError) as e:
        _fetch(url, policy)
    assert e.value.status == 400 and e.value.code == code, (e.value.code, e.value.message)
    return e.value


def test_fetch_connects_to_the_checked_address_without_a_second_lookup(origin, dns):
    """The name resolves to 127.0.0.1 once; a second lookup would answer 127.0.0.2, where nothing
    listens (the rebinding case): the fetch must use the first answer and never ask again."""
    dns["media.test"] = ["127.0.0.1", "127.0.0.2"]
    _Handler.seen_hosts.clear()
    assert _fetch(f"http://media.test:{origin}/img.png", _policy()) == PAYLOAD
    assert dns["calls"].count("media.test") == 1
    assert _Handler.seen_hosts == [f"media.test:{origin}"]  # the server still sees the name


def test_redirects_are_followed_and_each_hop_is_checked(origin, dns):
    assert _fetch(f"http://media.test:{origin}/hop/2", _policy(max_redirects=3)) == PAYLOAD
    _refused(f"http://media.test:{origin}/hop/5", _policy(max_redirects=3), "media_fetch_failed")
    err = _refused(f"http://media.test:{origin}/to-private", _policy(), "media_address_forbidden")
    assert "10.1.2.3" in err.message
    _refused(f"http://media.test:{origin}/to-file", _policy(), "invalid_url")


def test_size_limits(origin, dns):
    _refused(f"http://media.test:{origin}/big-declared", _policy(max_bytes=1000), "media_too_large")
    _refused(f"http://media.test:{origin}/big-chunked", _policy(max_bytes=10_000), "media_too_large")
    assert len(_fetch(f"http://media.test:{origin}/big-chunked", _policy(max_bytes=10**6))) == 64 * 1024


def test_time_limit(origin, dns):
    _refused(f"http://media.test:{origin}/slow", _policy(timeout_s=0.3), "media_fetch_timeout")


def test_http_errors_and_unreachable_hosts(origin, dns):
    err = _refused(f"http://media.test:{origin}/missing", _policy(), "media_fetch_failed")
    assert "404" in err.message
    dns["media.test"] = ["127.0.0.2"]  # allowed by nobody: refused before connecting
    _refused(f"http://media.test:{origin}/img.png", _policy(), "media_address_forbidden")


def test_default_rule_refuses_loopback_even_through_a_name(origin, dns):
    err = _refused(f"http://media.test:{origin}/img.png", MediaPolicy(allow_remote=True), "media_address_forbidden")
    assert "127.0.0.1" in err.message


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::8.8.8.8", True), ("2002:808:808::", True),
    ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("10.0.0.1", False), ("100.64.0.1", False), ("169.254.169.254", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("::1", False), ("::", False), ("fe80::1", False),
    ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False),  # IPv4-mapped
    ("::127.0.0.1", False),  # IPv4-compatible (deprecated, still routed by some stacks)
    ("::10.0.0.1", False),
    ("64:ff9b::7f00:1", False),  # NAT64 well-known prefix -> 127.0.0.1
    ("64:ff9b::a9fe:a9fe", False),  # NAT64 -> 169.254.169.254 (cloud metadata)
    ("64:ff9b:1::7f00:1", False),  # local-use NAT64 prefix
    ("2002:7f00:1::", False),  # 6to4 -> 127.0.0.1
    ("2002:a00:1::", False),  # 6to4 -> 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo -> client 127.0.0.1
])
def test_address_rule(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999/a.png", "http://exa mple.com/a.png",
                                 "http://:80/a.png", "http:///a.png"])
def test_malformed_urls_are_400(url):
    with pytest.raises(APIError) as e:
        _fetch(url, MediaPolicy(allow_remote=True))
    assert e.value.status == 400 and e.value.code in ("invalid_url", "media_fetch_failed")


def test_nul_bytes_in_local_paths_are_400(tmp_path):
    policy = MediaPolicy(media_dir=tmp_path)
    for url in ("a\x00b.png", "file:///tmp/a\x00.png", "file://" + str(tmp_path) + "/%00.png"):
        with pytest.raises(APIError) as e:
            _fetch(url, policy)
        assert e.value.status == 400 and e.value.code == "invalid_url", url


def test_pinned_request_keeps_host_and_tls_name():
    """For https the TLS name (SNI and certificate check) is the URL's host, not the address."""
    url, headers, ext = media.pinned_request("https://img.example.com/a.png?x=1", ipaddress.ip_address("1.2.3.4"))
    assert url == "https://1.2.3.4:443/a.png?x=1"
    assert headers == {"Host": "img.example.com"} and ext == {"sni_hostname": "img.example.com"}
    url, headers, ext = media.pinned_request("http://[2606:4700::1]:8080/a", ipaddress.ip_address("2606:4700::1"))
    assert url == "http://[2606:4700::1]:8080/a" and headers == {"Host": "[2606:4700::1]:8080"} and ext == {}
