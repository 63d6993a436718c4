"""Fetching the bytes behind an ``image_url`` / ``video_url``, within the server's limits.

Three kinds of URL are understood:

* ``data:<mime>;base64,<payload>``: always allowed; the payload must be valid base64 and at most
  ``max_bytes`` once decoded.
* ``http://`` / ``https://``: only with ``allow_remote`` (``--allow-remote-media``). Every hop
  (redirects are followed by hand, at most ``max_redirects``) must resolve to public addresses
  only (no loopback, private, link-local, reserved or multicast ranges); the download is capped
  at ``max_bytes`` and ``timeout_s`` overall. The address check happens just before connecting;
  a DNS answer that changes in between (rebinding) is not defended against beyond that.
* ``file://`` URLs and plain paths: only with ``media_dir`` (``--media-dir``); the path, with
  symlinks resolved, must lie inside that directory.

Each refusal is an ``APIError`` with the status the error table in ``errors.py`` documents.
Decoding the bytes into an image or a video is not done here (``app.py`` calls the processing
layer for that).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from .errors import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it."""

    allow_remote: bool = False
    media_dir: Path | None = None
    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0
    max_redirects: int = 3


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
    raw = unquote(urlsplit(url).path) if url.startswith("file:") else url
    root = media_dir.resolve()
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    real = path.resolve()
    if not real.is_relative_to(root):
        raise _bad(f"the path {raw!r} is outside the server's media directory", "media_path_forbidden", 403)
    if not real.is_file():
        raise _bad(f"no such file in the media directory: {raw!r}", "media_not_found")
    return real


async def _check_host(host: str | None, port: int) -> None:
    if not host:
        raise _bad("the media URL has no host", "invalid_url")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise _bad(f"cannot resolve the media host {host!r}: {e}", "media_fetch_failed") from e
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        mapped = getattr(ip, "ipv4_mapped", None)
        ip = mapped or ip
        if not ip.is_global or ip.is_multicast:
            raise _bad(f"the media host {host!r} resolves to a non-public address ({ip}); refused",
                       "media_address_forbidden")


async def _download(client: httpx.AsyncClient, url: str, policy: MediaPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _bad(f"media redirect to an unsupported scheme {parts.scheme!r}", "invalid_url")
        await _check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        async with client.stream("GET", url) as resp:
            if resp.is_redirect and "location" in resp.headers:
                url = urljoin(url, resp.headers["location"])
                continue
            if resp.status_code != 200:
                raise _bad(f"fetching the media URL returned HTTP {resp.status_code}", "media_fetch_failed")
            chunks, total = [], 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > policy.max_bytes:
                    raise _bad(f"the media URL holds more than {policy.max_bytes} bytes", "media_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    raise _bad(f"the media URL redirects more than {policy.max_redirects} times", "media_fetch_failed")


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
    except httpx.HTTPError as e:
        raise _bad(f"fetching the media URL failed: {e}", "media_fetch_failed") from e


async def fetch_media(url: str, policy: MediaPolicy) -> bytes:
    """The bytes behind a media URL (data:, http(s):, file: or a path), or an ``APIError``."""
    if not isinstance(url, str) or not url:
        raise _bad("a media URL must be a non-empty string", "invalid_url")
    scheme = urlsplit(url).scheme.lower() if ":" in url[:12] else ""
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
