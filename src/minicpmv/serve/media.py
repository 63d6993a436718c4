"""Fetching the bytes behind an ``image_url`` / ``video_url``, within the server's limits.

Three kinds of URL are understood:

* ``data:<mime>;base64,<payload>``: always allowed; the payload must be valid base64 and at most
  ``max_bytes`` once decoded.
* ``http://`` / ``https://``: only with ``allow_remote`` (``--allow-remote-media``). Each hop
  (redirects are followed by hand, at most ``max_redirects``) resolves its host once; every
  address of the answer must pass ``address_allowed`` (default ``is_public_address``: no
  loopback, private, link-local, shared, reserved or multicast ranges, also not when embedded in
  an IPv6 address: IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo), and the connection is
  made to the checked address itself (the URL's host goes in the Host header and, for https,
  in the TLS server name and certificate check), so a DNS answer that changes between the check
  and the connection (rebinding) cannot redirect it. The download is capped at ``max_bytes``
  (declared Content-Length first, then the bytes read) and ``timeout_s`` overall.
* ``file://`` URLs and plain paths: only with ``media_dir`` (``--media-dir``); the path, with
  symlinks resolved, must lie inside that directory.

Each refusal is an ``APIError`` with the status the error table in ``errors.py`` documents
(malformed URLs, NUL bytes included, are 400). Decoding the bytes into an image or a video is
not done here (``app.py`` calls the processing layer for that).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import httpx

from .errors import APIError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = logging.getLogger(__name__)


# IPv6 ranges whose low 32 bits are an IPv4 address the packet ends up at
_V4_IN_LOW_BITS = (ipaddress.ip_network("::/96"), ipaddress.ip_network("64:ff9b::/96"),
                   ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    out = [v for v in (ip.ipv4_mapped, ip.sixtofour) if v is not None]
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if any(ip in net for net in _V4_IN_LOW_BITS):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address that embeds no non-public IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _V4_IN_LOW_BITS[2]:
            return False  # local-use NAT64: translated inside the local network
        if not all(is_public_address(v4) for v4 in _embedded_ipv4(ip)):
            return False
    return bool(ip.is_global) and not ip.is_multicast


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it. ``address_allowed`` decides which resolved
    addresses a remote fetch may connect to (tests allow a loopback server with it)."""

    allow_remote: bool = False
    media_dir: Path | None = None
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0
    max_redirects: int = 3
    address_allowed: Callable[[IPAddress], bool] = is_public_address


def _bad(message: str, code: str, status: int = 400) -> APIError:
    return APIError(status, message, code=code, param="messages")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The payload of a base64 ``data:`` URL (400 when malformed or too large)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:"):
        raise _bad("malformed data: URL; expected data:<mime type>;base64,<data>", "invalid_data_url")
    if not head.lower().endswith(";base64"):
        raise _bad("data: URLs must be base64-encoded (data:<mime type>;base64,<data>)", "invalid_data_url")
    compact = "".join(payload.split())
    if len(compact) * 3 // 4 > max_bytes + 3:
        raise _bad(f"the data: URL holds more than {max_bytes} bytes", "media_too_large")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"the data: URL is not valid base64: {e}", "invalid_base64") from e
    if not data:
        raise _bad("the data: URL is empty", "invalid_data_url")
    if len(data) > max_bytes:
        raise _bad(f"the data: URL holds {len(data)} bytes, over the limit of {max_bytes}", "media_too_large")
    return data


def resolve_local(url: str, media_dir: Path | None) -> Path:
    """A local file allowed by ``media_dir`` (403 outside it, 400 when local files are off)."""
    if media_dir is None:
        raise _bad("local file paths are disabled on this server (start it with --media-dir DIR)",
                   "local_media_disabled")
    raw = unquote(_split(url).path) if url.startswith("file:") else url
    if "\0" in raw:
        raise _bad("the media path holds a NUL byte", "invalid_url")
    root = media_dir.resolve()
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    real = path.resolve()
    if not real.is_relative_to(root):
        raise _bad(f"the path {raw!r} is outside the server's media directory", "media_path_forbidden", 403)
    if not real.is_file():
        raise _bad(f"no such file in the media directory: {raw!r}", "media_not_found")
    return real


def _split(url: str) -> SplitResult:
    """``urlsplit`` with malformed URLs (a bad IPv6 literal, a port out of range) as 400s."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise _bad(f"malformed media URL: {e}", "invalid_url") from e
    return parts


async def _resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise _bad(f"cannot resolve the media host {host!r}: {e}", "media_fetch_failed") from e
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


async def checked_address(host: str | None, port: int, policy: MediaPolicy) -> IPAddress:
    """Resolve ``host`` once; every address must be allowed; the first one is returned (the
    fetch connects to it, so no second lookup can change where the request goes)."""
    if not host:
        raise _bad("the media URL has no host", "invalid_url")
    addresses = await _resolve(host, port)
    if not addresses:
        raise _bad(f"the media host {host!r} has no address", "media_fetch_failed")
    for ip in addresses:
        if not policy.address_allowed(ip):
            raise _bad(f"the media host {host!r} resolves to a non-public address ({ip}); refused",
                       "media_address_forbidden")
    return addresses[0]


def pinned_request(url: str, ip: IPAddress) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL with the address in place of the host, headers, httpx extensions) for fetching
    ``url`` from ``ip``: the Host header and the TLS server name stay the URL's host."""
    parts = _split(url)
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    headers = {"Host": shown if port == default else f"{shown}:{port}"}
    target = parts._replace(netloc=f"{literal}:{port}").geturl()
    return target, headers, ({"sni_hostname": host} if parts.scheme == "https" else {})


async def _download(client: httpx.AsyncClient, url: str, policy: MediaPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        parts = _split(url)
        if parts.scheme not in ("http", "https"):
            raise _bad(f"media redirect to an unsupported scheme {parts.scheme!r}", "invalid_url")
        ip = await checked_address(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), policy)
        target, headers, extensions = pinned_request(url, ip)
        async with client.stream("GET", target, headers=headers, extensions=extensions) as resp:
            if resp.is_redirect and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                continue
            if resp.status_code != 200:
                raise _bad(f"fetching the media URL returned HTTP {resp.status_code}", "media_fetch_failed")
            return await _read_capped(resp, policy.max_bytes)
    raise _bad(f"the media URL redirects more than {policy.max_redirects} times", "media_fetch_failed")


async def _read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _bad(f"the media URL holds {declared} bytes, over the limit of {max_bytes}", "media_too_large")
    chunks, total = [], 0
    async for chunk in resp.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise _bad(f"the media URL holds more than {max_bytes} bytes", "media_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def fetch_remote(url: str, policy: MediaPolicy) -> bytes:
    """Download an http(s) URL under the policy's limits."""
    if not policy.allow_remote:
        raise _bad("remote media URLs are disabled on this server (start it with --allow-remote-media), "
                   "send the image as a data: URL instead", "remote_media_disabled")
    timeout = httpx.Timeout(policy.timeout_s)
    try:
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client:
            return await asyncio.wait_for(_download(client, url, policy), policy.timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException) as e:
        raise _bad(f"fetching the media URL took longer than {policy.timeout_s} s", "media_fetch_timeout") from e
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise _bad(f"fetching the media URL failed: {e}", "media_fetch_failed") from e


async def fetch_media(url: str, policy: MediaPolicy) -> bytes:
    """The bytes behind a media URL (data:, http(s):, file: or a path), or an ``APIError``."""
    if not isinstance(url, str) or not url:
        raise _bad("a media URL must be a non-empty string", "invalid_url")
    scheme = _split(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "data":
        return decode_data_url(url, policy.max_bytes)
    if scheme in ("http", "https"):
        return await fetch_remote(url, policy)
    if scheme in ("file", ""):
        path = resolve_local(url, policy.media_dir)
        size = path.stat().st_size
        if size > policy.max_bytes:
            raise _bad(f"the file holds {size} bytes, over the limit of {policy.max_bytes}", "media_too_large")
        return await asyncio.to_thread(path.read_bytes)
    raise _bad(f"unsupported media URL scheme {scheme!r}; use data:, http(s): or file:", "invalid_url")
