"""Reliability: answers under load with faults injected, bad inputs per family, crashed training.

Three parts, one run (the README's "Reliability" table comes from its output):

1. Server: ``minicpmv serve`` (a subprocess on 127.0.0.1, tiny 4.5 checkpoint) answers C clients x
   R requests (streaming and not, text and images, greedy and seeded sampling) while faults are
   injected at the same time: clients hanging up mid-stream, clients giving up on a long answer,
   slowloris connections, a client that does not read its stream for a while, bodies and headers
   over the limits, malformed bodies and media. Every answer is compared with the answer the same
   request gets from the idle server: a missing or different answer counts as lost. Afterwards
   the server must be healthy and idle, and answer as before.
2. Bad inputs per family, in this process: mutated images (8 formats), mutated video containers
   (4), audio arrays and WAV files, message shapes and chat templates. Each must end in a result or
   a typed ``MiniCPMVError``; anything else counts as a crash.
3. Training (skip with ``--no-train``): a fine-tune SIGKILLed after a step and one SIGKILLed while
   writing a checkpoint are resumed; their losses must equal an uninterrupted run's and no
   checkpoint may be lost or left half written.

Examples:
  python bench/bench_reliability.py                     # about 3 minutes on 2 cores
  python bench/bench_reliability.py --clients 32 --requests 8 --json rel.json
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench_serve import TINY, start_server

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "data" / "conformance"


# ---------------------------------------------------------------------------- part 1: the server


def _png_url(seed: int, size: tuple[int, int] = (96, 64)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_pool() -> list[dict[str, Any]]:
    img = {"type": "image_url", "image_url": {"url": _png_url(1)}}
    user = [
        "Hi", "Tell me about the sea " * 8, [img, {"type": "text", "text": "What is this?"}],
        [{"type": "text", "text": "Compare"}, img, {"type": "image_url", "image_url": {"url": _png_url(2, (48, 80))}}],
    ]
    pool = []
    for i, content in enumerate(user):
        for sampled in (False, True):
            body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": 8 + i}
            body.update({"temperature": 0.8, "seed": 100 + i} if sampled else {"temperature": 0})
            pool.append(body)
    return pool


def ask(url: str, body: dict[str, Any], stream: bool, timeout: float = 300) -> str:
    """The answer text of one request (raises on any HTTP or protocol failure)."""
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or ""
    parts = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                parts += [c["delta"].get("content") or "" for c in json.loads(line[6:]).get("choices", [])]
    return "".join(parts)


def _hang_up(url: str, i: int) -> bool:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": 300,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        next(r.iter_lines())
        return r.status_code == 200


def _give_up(url: str, i: int) -> bool:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"long {i}"}], "max_tokens": 300}
    try:
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.2)
    except httpx.TimeoutException:
        return True
    return True  # answered within the time: nothing to survive, still fine


def _oversized(url: str, i: int) -> bool:
    if i % 2:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "bench", "messages": []},
                       headers={"X-Big": "x" * 100_000}, timeout=60)
        return r.status_code == 431
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * (60 * 2**20) + b"}", timeout=60,
                   headers={"content-type": "application/json"})
    return r.status_code == 413


def _bad_body(url: str, i: int) -> str:
    """One malformed request: 'typed error' (a 4xx OpenAI error), 'accepted' (200) or 'crash'."""
    rnd = random.Random(i)
    good = request_pool()[rnd.randrange(8)]
    kind = i % 5
    if kind == 0:
        raw = json.dumps(good).encode()
        raw = bytes(b if rnd.random() > 0.05 else rnd.randrange(256) for b in raw)
    elif kind == 1:
        raw = json.dumps({**good, rnd.choice(["max_tokens", "temperature", "n", "messages", "stop", "top_p"]):
                          rnd.choice([-1, 10**30, "x", None, [], {"a": 1}, 3.5])}).encode()
    elif kind == 2:
        data = bytearray(base64.b64decode(_png_url(i).split(",", 1)[1]))
        for _ in range(rnd.randrange(1, 8)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        url_ = "data:image/png;base64," + base64.b64encode(bytes(data)).decode()
        raw = json.dumps({**good, "messages": [{"role": "user", "content": [
            {"type": rnd.choice(["image_url", "video_url"]), rnd.choice(["image_url", "video_url"]): {"url": url_}},
            {"type": "text", "text": "?"}]}], "max_tokens": 2}).encode()
    elif kind == 3:
        raw = json.dumps({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": rnd.choice(["http://[::1", "file:///etc/passwd", "a\x00b.png", "data:,", "ftp://h/x"])}}]}]}).encode()
    else:
        raw = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 64)))
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, timeout=120, headers={"content-type": "application/json"})
    if 400 <= r.status_code < 500 and r.json()["error"]["message"]:
        return "typed error"
    return "accepted" if r.status_code == 200 else "crash"


class Slow:
    """Slowloris connections and a client that does not read its stream (until ``finish``)."""

    def __init__(self, port: int, n: int, stream_body: dict[str, Any]) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            self.socks.append(s)
        self.reader = socket.socket()
        self.reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.reader.connect(("127.0.0.1", port))
        raw = json.dumps({**stream_body, "stream": True}).encode()
        self.reader.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode() + raw)

    def finish(self) -> str:
        """Read the unread stream to its end; close everything; the stream's text."""
        import h11

        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())
        data = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(self.reader.recv(65536))
            elif isinstance(event, h11.Data):
                data += event.data
        for s in [*self.socks, self.reader]:
            s.close()
        parts = [c["delta"].get("content") or "" for line in data.decode().splitlines() if line.startswith("data: {")
                 for c in json.loads(line[6:]).get("choices", [])]
        return "".join(parts)


FAULTS = {"client hung up mid-stream": (_hang_up, 64), "client gave up (0.2 s timeout)": (_give_up, 16),
          "body / headers over the limit": (_oversized, 8), "malformed body or media": (_bad_body, 200)}


def serve_under_faults(args: argparse.Namespace) -> dict[str, Any]:
    proc, url = start_server(argparse.Namespace(model=args.model, dtype="float32", max_model_len=1024,
                                                src=ROOT / "src"),
                             ["--max-batch-size", "8", "--max-decoding", "2"])
    try:
        pool = request_pool()
        alone = [ask(url, b, stream=False) for b in pool]
        jobs = [(c * args.requests + i) % len(pool) for c in range(args.clients) for i in range(args.requests)]
        slow = Slow(int(url.rsplit(":", 1)[1]), 32, pool[1])
        tasks = [("answer", n) for n in range(len(jobs))] + [(name, i) for name, (_, n) in FAULTS.items()
                                                            for i in range(n)]
        random.Random(args.seed).shuffle(tasks)  # faults interleaved with the real requests
        with cf.ThreadPoolExecutor(args.clients + 16) as ex:
            futures = {t: ex.submit(ask, url, pool[jobs[t[1]]], bool(t[1] % 2)) if t[0] == "answer"
                       else ex.submit(FAULTS[t[0]][0], url, t[1]) for t in tasks}
            got = [_result(futures["answer", n]) for n in range(len(jobs))]
            outcomes = {name: [_result(futures[name, i]) for i in range(n)] for name, (_, n) in FAULTS.items()}
        ok = ("typed error", "accepted")
        survived = {name: sum(r is True or r in ok for r in rs) for name, rs in outcomes.items()}
        slow_ok = slow.finish() == ask(url, pool[1], stream=False)
        survived["slowloris (32) and unread stream (1)"] = 33 if slow_ok else 0
        health = _idle_health(url)  # abandoned requests end once their client's departure is noticed
        after = [ask(url, b, stream=False) for b in pool]
    finally:
        proc.terminate()
        proc.wait(30)
    lost = sum(g != alone[k] for g, k in zip(got, jobs, strict=True))
    injected = {name: n for name, (_, n) in FAULTS.items()} | {"slowloris (32) and unread stream (1)": 33}
    return {"requests": len(jobs), "lost": lost, "faults_injected": injected, "faults_survived": survived,
            "healthy_after": health["status"] == "ok" and health["in_flight"] == 0 and after == alone,
            "bodies": Counter(str(r) if isinstance(r, str) else "crash" for r in outcomes["malformed body or media"])}


def _idle_health(url: str, within_s: float = 10.0) -> dict[str, Any]:
    """/health once nothing is in flight, or the last answer after ``within_s`` seconds."""
    end = time.monotonic() + within_s
    while True:
        health = httpx.get(f"{url}/health", timeout=30).json()
        if health.get("in_flight") == 0 or time.monotonic() > end:
            return health
        time.sleep(0.1)


def _result(future: cf.Future) -> Any:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
        return e


# ---------------------------------------------------------------------------- part 2: bad inputs


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randrange(1, 6)):
        op, at = rnd.randrange(3), rnd.randrange(len(b) or 1)
        if op == 0 and b:
            b[at] = rnd.randrange(256)
        elif op == 1:
            del b[at:]
        else:
            b[at:at] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
    return bytes(b)


def _outcome(fn: Any, *a: Any, **kw: Any) -> str:
    from minicpmv.errors import MiniCPMVError

    try:
        fn(*a, **kw)
        return "accepted"
    except MiniCPMVError:
        return "typed error"
    except Exception:  # noqa: BLE001 - what the bench counts
        return "crash"


def bad_inputs(n: int, seed: int) -> dict[str, Counter]:
    import minicpmv
    from minicpmv.engine.chat import normalise_msgs
    from minicpmv.processing.audio import AudioFeatureConfig, check_waveform
    from minicpmv.processing.chat_template import ChatTemplate
    from minicpmv.processing.image import load_image
    from minicpmv.processing.video import Video
    from minicpmv.versions import get_version

    rnd = random.Random(seed)
    images, clips = _sample_files()
    model = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")
    policy = get_version("4.5").video
    out: dict[str, Counter] = {}
    out["images"] = Counter(_outcome(load_image, _mutate(rnd.choice(images), rnd), max_pixels=10**7)
                            for _ in range(n))
    out["video containers"] = Counter(_outcome(lambda d: list(Video(d).expand(policy).frames),
                                               _mutate(rnd.choice(clips), rnd)) for _ in range(n // 4))
    cfg = AudioFeatureConfig()
    out["audio clips"] = Counter(_outcome(check_waveform, *_audio(rnd), cfg, "clip") for _ in range(n))
    out["message shapes"] = Counter(
        _outcome(lambda m: model.processor(normalise_msgs(m, None)[0]), _message(rnd)) for _ in range(n))
    template = ChatTemplate(json.loads((CONF / "4.5" / "_checkpoint" / "tokenizer_config.json").read_text())[
        "chat_template"])
    out["chat templates"] = Counter(_outcome(template.render, _message(rnd)) for _ in range(n // 2)) + Counter(
        _outcome(lambda s: ChatTemplate(s).render([]), _template_source(rnd)) for _ in range(n // 2))
    return out


def _sample_files() -> tuple[list[bytes], list[bytes]]:
    from fractions import Fraction

    import av

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (23, 37, 3), dtype=np.uint8))
    images = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"):
        buf = io.BytesIO()
        (img.convert("P") if fmt == "GIF" else img).save(buf, format=fmt)
        images.append(buf.getvalue())
    clips = []
    for container, codec in (("mp4", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4"), ("matroska", "mpeg4")):
        buf = io.BytesIO()
        with av.open(buf, "w", format=container) as c:
            s = c.add_stream(codec, rate=Fraction(5))
            s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
            for k in range(6):
                for p in s.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), 30 * k, np.uint8), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        clips.append(buf.getvalue())
    return images, clips


def _audio(rnd: random.Random) -> tuple[Any, Any]:
    shape = rnd.choice([(), (rnd.randrange(20000),), (rnd.randrange(40), rnd.randrange(40))])
    dtype = rnd.choice(["float32", "float64", "int16", "uint8", "complex64", "bool", "object"])
    with np.errstate(all="ignore"):
        x = np.full(shape, rnd.choice([0.0, 0.5, np.nan, np.inf, 1e30])).astype(dtype)
    return x, rnd.choice([None, 16000, 8000, 0, -1, 16000.5, "", float("inf"), float("nan")])


def _message(rnd: random.Random) -> Any:
    def item() -> Any:
        image = Image.new("RGB", (rnd.randrange(1, 600), rnd.randrange(1, 200)))
        return rnd.choice(["text", "", None, 3, 2.5, image, {"type": rnd.choice(["text", "image", "video", "x"])},
                           ["nested"], b"bytes"])

    def msg() -> Any:
        role = rnd.choice(["user", "assistant", "system", "tool", "", None, 7])
        return rnd.choice([{"role": role, "content": rnd.choice([item(), [item() for _ in range(3)]])},
                           {"role": role}, "text", None])

    return rnd.choice([[msg() for _ in range(rnd.randrange(0, 4))], [[msg()]], "not json", None, {"role": "user"}])


def _template_source(rnd: random.Random) -> str:
    parts = ["{{", "}}", "{%", "%}", " for m in messages ", " endfor ", " if ", " endif ", "1/0", "messages[9]",
             " raise_exception('x') ", "x", " | tojson ", "''.__class__", " macro f() ", " endmacro ", " f() "]
    return "".join(rnd.choice(parts) for _ in range(rnd.randrange(1, 12))) or "x"


# ---------------------------------------------------------------------------- part 3: training


def crashed_training() -> dict[str, Any]:
    helper = ROOT / "tests" / "train" / "crash_run.py"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _train_data(root)
        common = ["finetune", "--model", str(CONF / "2.6" / "_checkpoint"), "--data", str(data), "--max-steps", "6",
                  "--grad-accum", "2", "--lr", "3e-3", "--save-every", "2", "--export-dtype", "float32",
                  "--no-progress", "--tune-resampler"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}

        def run(mode: str, n: int, out: Path, *extra: str) -> int:
            cmd = [sys.executable, str(helper), mode, str(n), "--", *common, "--output", str(out), *extra]
            return subprocess.run(cmd, capture_output=True, env=env, timeout=600).returncode

        def losses(out: Path) -> dict[int, float]:
            return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}

        run("none", 0, root / "ref")
        results = {}
        for mode, n in (("after-step", 3), ("during-checkpoint", 4)):
            out = root / mode
            killed = run(mode, n, out) == -9
            resumed = run("none", 0, out, "--resume") == 0
            names = sorted(p.name for p in (out / "checkpoints").iterdir())
            results[mode] = killed and resumed and losses(out) == losses(root / "ref") and names == [
                "step-00000002", "step-00000004"]
        results["export on a full disk"] = _export_on_full_disk(root / "ref" / "adapter", root / "merged")
    return results


def _export_on_full_disk(adapter: Path, out: Path) -> bool:
    """``minicpmv export`` whose weight write fails with ENOSPC half way: a one-line error (exit 2)
    and nothing left behind (neither the output folder nor a partial one)."""
    import contextlib
    import errno

    from minicpmv.cli import main as cli
    from minicpmv.train import model as tmodel

    real = tmodel.save_safetensors

    def full_disk(tensors: dict, path: Any, **kw: Any) -> None:
        real(dict(list(tensors.items())[:3]), path, **kw)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    tmodel.save_safetensors = full_disk
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli(["export", "--model", str(CONF / "2.6" / "_checkpoint"), "--adapter", str(adapter),
                      "--output", str(out), "--merge-lora"])
    finally:
        tmodel.save_safetensors = real
    left = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
    return rc == 2 and err.getvalue().count("\n") == 1 and "No space left" in err.getvalue() and not left


def _train_data(root: Path) -> Path:
    Image.new("RGB", (40, 30), (220, 30, 30)).save(root / "a.png")
    Image.new("RGB", (30, 40), (30, 30, 220)).save(root / "b.png")
    records = [{"id": f"s{i}", "image": "a.png" if i % 2 == 0 else "b.png",
                "conversations": [{"role": "user", "content": f"What colour is it? ({i})"},
                                  {"role": "assistant", "content": "red" if i % 2 == 0 else "blue"}]}
               for i in range(4)]
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


# ---------------------------------------------------------------------------- report


def report(server: dict[str, Any], inputs: dict[str, Counter], training: dict[str, Any] | None,
           args: argparse.Namespace, seconds: float) -> None:
    import torch

    import minicpmv

    injected, survived = server["faults_injected"], server["faults_survived"]
    print(f"\nminicpmv {minicpmv.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} cores; {seconds:.0f} s")
    print("\n| measure | result |\n|---|---|")
    print(f"| requests served under load ({args.clients} clients x {args.requests}, faults injected meanwhile) | "
          f"{server['requests'] - server['lost']} of {server['requests']} answered exactly as on an idle server |")
    print(f"| results lost | **{server['lost']}** |")
    print(f"| faults survived | {sum(survived.values())} of {sum(injected.values())}: "
          + ", ".join(f"{name} {survived[name]}/{n}" for name, n in injected.items()) + " |")
    print(f"| server after the run | {'healthy, idle, same answers' if server['healthy_after'] else 'NOT healthy'} |")
    for family, c in inputs.items():
        print(f"| bad inputs: {family} | {sum(c.values())} tried: {c['typed error']} typed errors, "
              f"{c['accepted']} accepted, **{c['crash']} crashes** |")
    c = server["bodies"]
    print(f"| bad inputs: OpenAI request bodies (under load) | {sum(c.values())} tried: {c['typed error']} typed "
          f"4xx errors, {c['accepted']} answered, **{c['crash']} 5xx or broken** |")
    if training is not None:
        for mode, ok in training.items():
            when = {"after-step": "after a step", "during-checkpoint": "while writing a checkpoint"}.get(mode, mode)
            what = "export on a full disk" if mode.startswith("export") else f"fine-tune SIGKILLed {when}, resumed"
            good = ("one-line error, nothing half written" if mode.startswith("export")
                    else "identical losses, checkpoints intact")
            print(f"| {what} | {good if ok else 'FAILED'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=TINY, help="checkpoint the server loads (default: tiny 4.5)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--inputs", type=int, default=400, help="bad inputs per family (video: a quarter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="skip the training crash part")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    start = time.perf_counter()
    server = serve_under_faults(args)
    with warnings.catch_warnings():  # Pillow warns about the damaged files it then refuses
        warnings.simplefilter("ignore")
        inputs = bad_inputs(args.inputs, args.seed)
    training = None if args.no_train else crashed_training()
    report(server, inputs, training, args, time.perf_counter() - start)
    if args.json:
        args.json.write_text(json.dumps({"server": server, "inputs": {k: dict(v) for k, v in inputs.items()},
                                         "training": training}, indent=2, default=dict))
    failed = server["lost"] or not server["healthy_after"] or any(c["crash"] for c in inputs.values()) or (
        server["bodies"]["crash"] or training is not None and not all(training.values()))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
