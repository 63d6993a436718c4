"""Speech output speed: real-time factor of MiniCPM-o 2.6's speech head + vocoder on this CPU.

Builds the speech head at the real o2.6 sizes (``tts_config`` defaults with ``llm_dim`` 3584:
a 20-layer, width-768 Llama decoder over 4 codebooks, the 21178-row text table, the real DVAE
and the real Vocos) with random weights, in float32 as the official code runs it
(``model.tts.float()``), and runs the production functions of ``engine/speech.py``:

- ``chat``: ``SpeechSynthesizer.codes`` for one answer (chunked text prefill, 25-frame calls)
  then ``waveform`` (GFSQ -> DVAE -> mel -> Vocos). Random weights draw the end id at random
  moments, so the frames are teacher-forced (random codes, every score still computed) to make
  exactly ``--frames`` frames. Reported: decoder ms per frame, decoding (DVAE + Vocos) time per
  audio second, real-time factor = audio seconds produced per wall second, and the latency to
  the (whole) waveform.
- ``stream``: ``SpeechSynthesizer.stream`` fed 3-word text pieces as fast as they come (the LLM
  is not part of this measurement), with the end id banned so every chunk is 25 frames; time to
  the first audio chunk for the reference variant (first chunk held until the second) and the
  early variant, and the real-time factor over ``--chunks`` chunks.

Each frame reads every decoder weight once, so the decoder is bound by memory bandwidth: the
run also measures the read bandwidth and prints each ms/frame next to its ceiling (decoder +
head bytes / bandwidth). ``--dtypes float32,bfloat16`` adds a bf16 speech head with its decoder
prepacked for oneDNN (``SpeechSynthesizer.from_chat_model(dtype=torch.bfloat16)``; faster on a
CPU, but its codes are not expected to match the official float32 ones).

The ChatTTS tokenizer is the tiny test one (text handling is not what is measured); the LLM that
produces the text and the speaker state is not run. The machine is shared: compare numbers
within one run (``--rounds`` repeats, best reported).

  python bench/bench_tts.py                  # ~2 minutes on 2 cores
  python bench/bench_tts.py --frames 500 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from _common import read_bandwidth
from minicpmv.config import TTSConfig
from minicpmv.engine.speech import SAMPLING_RATE, SpeechSynthesizer
from minicpmv.modeling.tts import ConditionalChatTTS
from minicpmv.modeling.vocos import Vocos
from minicpmv.processing.tts_text import ChatTTSTokenizer
from minicpmv.quant.linear import prepack_linears

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "data" / "conformance" / "o2.6-tts" / "_checkpoint" / "assets" / "chattts_tokenizer"
FRAME_SECONDS = 512 / SAMPLING_RATE  # one code frame = 2 mel frames x hop 256
TEXT = ("hello world how are you today i have two three books and four cats what color is the sky "
        "it is blue ") * 4


def build(seed: int) -> SpeechSynthesizer:
    """Real-size speech head and vocoder with random weights (special ids of the tiny tokenizer)."""
    torch.manual_seed(seed)
    tok = ChatTTSTokenizer.from_dir(TOKENIZER)
    cfg = TTSConfig(llm_dim=3584, spk_emb_token_id=tok.token_to_id("[spk_emb]"),
                    audio_bos_token_id=tok.token_to_id("[Ptts]"), text_eos_token_id=tok.token_to_id("[Etts]"))
    tts = ConditionalChatTTS(cfg).eval()
    vocos = Vocos().eval()
    with torch.no_grad():
        for head in tts.head_code:
            head.parametrizations.weight.original1.normal_(0, 0.05)
        for name, p in [*tts.dvae.named_parameters(), *vocos.named_parameters()]:
            if name.endswith(("coef", "gamma")):
                p.fill_(0.1)
        vocos.head.istft.window.copy_(torch.hann_window(1024))
    return SpeechSynthesizer(tts, vocos, tok)


def frame_bytes(synth: SpeechSynthesizer, dtype: torch.dtype) -> int:
    """Weight bytes one generated frame reads: decoder layers + norm and the 4 heads."""
    tts = synth.tts
    n = sum(p.numel() for p in tts.model.layers.parameters()) + tts.model.norm.weight.numel()
    n += sum(h.parametrizations.weight.original1.numel() for h in tts.head_code)
    return n * torch.finfo(dtype).bits // 8


def chat(synth: SpeechSynthesizer, frames: int, rounds: int) -> dict[str, float]:
    spk = torch.randn(3584)
    forced = torch.randint(0, 625, (frames, 4))
    best: dict[str, float] = {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        codes = synth.codes(TEXT, spk, synth.default_options(seed=0), forced=forced)
        t1 = time.perf_counter()
        wav = synth.waveform(codes)
        t2 = time.perf_counter()
        assert codes.shape[0] == frames and wav.shape[0] == frames * 512
        r = {"codes_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0}
        best = r if not best or r["total_s"] < best["total_s"] else best
    audio = frames * FRAME_SECONDS
    best.update(audio_s=audio, ms_per_frame=1000 * best["codes_s"] / frames,
                decode_per_audio_s=best["decode_s"] / audio, rtf=audio / best["total_s"])
    return best


def stream(synth: SpeechSynthesizer, chunks: int, first_chunk: str) -> dict[str, float]:
    words = TEXT.split() * 4
    pieces = [" " + " ".join(words[i : i + 3]) for i in range(0, len(words), 3)]
    opts = synth.default_options(seed=0, min_frames_per_call=25)  # no end id: every chunk is 25 frames
    t0 = time.perf_counter()
    s = synth.stream(torch.randn(3584), opts, first_chunk=first_chunk)  # type: ignore[arg-type]
    first = None
    samples = 0
    emitted = 0
    for piece in pieces:
        for c in s.feed(piece):
            samples += len(c.audio_wav)
            emitted += 1
            first = first if first is not None else time.perf_counter() - t0
        if emitted >= chunks:
            break
    wall = time.perf_counter() - t0
    audio = samples / SAMPLING_RATE
    return {"first_audio_s": first or float("nan"), "chunks": emitted, "audio_s": audio, "wall_s": wall,
            "rtf": audio / wall}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{cpu}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; load average "
            f"{load[0]:.1f}; torch {torch.__version__}; python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=150, help="code frames of the chat-path answer (150 = 3.2 s)")
    ap.add_argument("--chunks", type=int, default=4, help="streamed chunks to time")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtypes", default="float32,bfloat16", help="speech head dtypes (float32 = official)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    synth = build(args.seed)
    params = sum(p.numel() for p in synth.tts.parameters()) + sum(p.numel() for p in synth.vocos.parameters())
    print(f"machine: {machine()}")
    print(f"speech head + vocoder: {params / 1e6:.0f} M parameters, built in {time.perf_counter() - t:.1f} s")
    bw = read_bandwidth(1 << 29)
    print(f"read bandwidth measured now: {bw / 1e9:.1f} GB/s")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        synth.tts.to(dtype)
        prepack_linears(synth.tts.model)  # as SpeechSynthesizer.from_chat_model: bf16 on a CPU only
        ceiling = 1000 * frame_bytes(synth, dtype) / bw
        with torch.inference_mode():
            c = chat(synth, args.frames, args.rounds)
            hold = min((stream(synth, args.chunks, "hold") for _ in range(args.rounds)), key=lambda r: r["wall_s"])
            early = min((stream(synth, 1, "early") for _ in range(args.rounds)), key=lambda r: r["first_audio_s"])
        print(f"\n== speech head in {name} (Vocos float32); best of {args.rounds}")
        print(f"chat path, {args.frames} frames = {c['audio_s']:.2f} s of audio:")
        print(f"  speech decoder   {c['codes_s']:.2f} s: {c['ms_per_frame']:.1f} ms per frame (a frame is "
              f"{1000 * FRAME_SECONDS:.1f} ms of audio; bandwidth ceiling {ceiling:.1f} ms, "
              f"{ceiling / c['ms_per_frame']:.0%} of it)")
        print(f"  DVAE + Vocos     {c['decode_s']:.2f} s ({c['decode_per_audio_s']:.3f} s per audio second)")
        print(f"  real-time factor {c['rtf']:.2f}x (audio seconds per wall second); waveform after "
              f"{c['total_s']:.2f} s")
        print("streaming, text pieces arriving instantly:")
        print(f"  first audio after {hold['first_audio_s']:.2f} s (reference: first chunk held for the second), "
              f"{early['first_audio_s']:.2f} s (early variant)")
        print(f"  {hold['chunks']} chunks, {hold['audio_s']:.2f} s of audio in {hold['wall_s']:.2f} s: real-time "
              f"factor {hold['rtf']:.2f}x")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
