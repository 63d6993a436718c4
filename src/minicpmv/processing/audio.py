"""Audio input for MiniCPM-o: clips in messages, WAV reading, log-mel features, placeholders.

Content items ``np.ndarray`` (a 16 kHz mono float waveform) or ``{"type": "audio", "audio":
array | path, "sampling_rate": 16000}`` are taken out of the messages (``extract_audio``) and
replaced by the ``(<audio>./</audio>)`` tag, as the reference's ``chat()`` does; clips are
checked (rank, dtype, finiteness, sample rate, length limit) with ``AudioError``. WAV files are
read with the standard ``wave`` module (PCM only; no resampling, no channel mixing);
``read_audio`` reads any format at any rate through PyAV when it is installed; ``save_wav`` /
``wav_bytes`` write speech output as 16-bit PCM.

Features follow Whisper's feature extractor as the reference calls it (spec o2.6 §4.7): a clip
is cut into 30-s pieces, each piece is zero-padded to 30 s, framed (Hann window, n_fft 400, hop
160, centred with reflection), turned into a Slaney-normalised 80-band mel power spectrogram,
``log10(max(., 1e-10))``, floored at ``max - 8`` over the padded piece, mapped by ``(x + 4) / 4``
and finally cut to ``ceil(samples / 160)`` frames. The placeholder of a clip is one
``<|audio_start|>`` + ``<unk>`` * n + ``<|audio_end|>`` group per second of audio (25 tokens per
full chunk). numpy only; the encoder itself lives in ``modeling/audio_whisper.py``.
"""

from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError, InputError

AUDIO_TAG = "(<audio>./</audio>)"
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class AudioFeatureConfig:
    """Whisper feature-extractor settings (``preprocessor_config.json``) and our clip limit."""

    sampling_rate: int = SAMPLE_RATE
    feature_size: int = 80  # mel bands
    n_fft: int = 400
    hop_length: int = 160
    chunk_length: int = 30  # seconds per encoder segment
    max_seconds: float = 600.0  # longest clip accepted (not in the reference, which has no limit)
    chunk_seconds: float = 1.0  # audio_chunk_length of config.json: one placeholder group per chunk
    audio_start: str = "<|audio_start|>"
    audio_end: str = "<|audio_end|>"
    unk: str = "<unk>"

    @property
    def n_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> AudioFeatureConfig:
        kw: dict[str, Any] = {}
        for key in ("sampling_rate", "feature_size", "n_fft", "hop_length", "chunk_length"):
            if key in d:
                kw[key] = int(d[key])
        if "max_audio_seconds" in d:
            kw["max_seconds"] = float(d["max_audio_seconds"])
        return cls(**kw)


# ---------------------------------------------------------------------------- clips


def check_waveform(x: Any, sampling_rate: int | None, cfg: AudioFeatureConfig, where: str) -> np.ndarray:
    """A validated float32 1-D waveform, or AudioError saying what to change."""
    if sampling_rate is not None and int(sampling_rate) != cfg.sampling_rate:
        raise AudioError(
            f"{where}: audio has a sample rate of {sampling_rate} Hz but MiniCPM-o needs {cfg.sampling_rate} Hz "
            "mono; resample it first (e.g. with soundfile/librosa/ffmpeg)"
        )
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        hint = " (integer PCM: divide by 32768 for int16)" if arr.dtype.kind in "iu" else ""
        raise AudioError(f"{where}: audio must be a float waveform in [-1, 1], got dtype {arr.dtype}{hint}")
    if arr.ndim != 1:
        raise AudioError(
            f"{where}: audio must be a 1-D mono waveform, got shape {arr.shape}; mix channels down to mono first"
        )
    if not np.all(np.isfinite(arr)):
        raise AudioError(f"{where}: audio contains NaN or infinite samples")
    seconds = arr.shape[0] / cfg.sampling_rate
    if seconds > cfg.max_seconds:
        raise AudioError(
            f"{where}: audio clip is {seconds:.1f} s long, longer than the limit of {cfg.max_seconds:g} s; "
            "cut it into shorter clips (the limit is AudioFeatureConfig.max_seconds / max_audio_seconds)"
        )
    if audio_token_count(arr.shape[0], cfg) < 1:
        raise AudioError(f"{where}: audio clip of {arr.shape[0]} samples is too short (at least 40 ms is needed)")
    return arr.astype(np.float32, copy=False)


def load_wav(path: str | Path | io.BytesIO) -> tuple[np.ndarray, int]:
    """A PCM WAV file (or its bytes in a ``BytesIO``) as (float32 samples [N] or [N, channels]
    in [-1, 1], sample rate)."""
    p = Path(path) if not isinstance(path, io.BytesIO) else Path("<bytes>")
    try:
        with wave.open(path if isinstance(path, io.BytesIO) else str(p), "rb") as f:
            rate, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
            raw = f.readframes(f.getnframes())
    except FileNotFoundError as e:
        raise AudioError(f"audio file {p} does not exist") from e
    except (wave.Error, EOFError, OSError) as e:
        raise AudioError(f"{p} is not a readable PCM WAV file ({e}); convert it to 16-bit PCM WAV") from e
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        ints = np.frombuffer(raw, dtype=np.dtype(f"<i{width}"))
        data = ints.astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise AudioError(f"{p}: {8 * width}-bit WAV is not supported; use 16-bit PCM")
    return (data if channels == 1 else data.reshape(-1, channels)), rate


def read_audio(src: str | Path | bytes, rate: int = SAMPLE_RATE, *, what: str = "audio") -> np.ndarray:
    """Any audio file or its bytes as a float32 mono waveform at ``rate`` Hz (microphone
    recordings, reference clips, uploads). A PCM WAV already at ``rate`` and mono is read
    exactly (``load_wav``); anything else is decoded and resampled with PyAV (libswresample;
    the ``[video]`` / ``[ui]`` extras) and its channels averaged, or refused with what to install."""
    data: bytes | None = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else None
    if data is None and not Path(src).is_file():  # type: ignore[arg-type]
        raise AudioError(f"{what} file {src} does not exist")
    try:
        wav, got = load_wav(io.BytesIO(data) if data is not None else src)  # type: ignore[arg-type]
        if got == rate and wav.ndim == 1:
            return wav
    except AudioError:
        pass  # not a PCM WAV: let PyAV decode it
    try:
        import av
    except ImportError as e:
        raise AudioError(f"{what}: only {rate} Hz mono PCM WAV can be read without PyAV; convert it, or "
                         "pip install 'minicpmv[ui]' to read other rates and formats") from e
    try:
        with av.open(io.BytesIO(data) if data is not None else str(src)) as container:
            if not container.streams.audio:
                raise AudioError(f"{what} holds no audio stream")
            resampler = av.AudioResampler(format="fltp", rate=rate)  # planar float, channels kept
            frames = [f for frame in container.decode(container.streams.audio[0]) for f in resampler.resample(frame)]
            frames += resampler.resample(None)
            parts = [f.to_ndarray().mean(axis=0) for f in frames]  # [channels, n] -> the channels' average
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise AudioError(f"{what} cannot be decoded as audio ({e})") from e
    if not parts:
        raise AudioError(f"{what} holds no audio samples")
    return np.concatenate(parts).astype(np.float32, copy=False)


def save_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """Write mono float samples in [-1, 1] as a 16-bit PCM WAV (values outside are clipped)."""
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim != 1:
        raise AudioError(f"save_wav writes mono audio: expected samples [N], got shape {data.shape}")
    if not np.isfinite(data).all():
        raise AudioError("save_wav: the samples hold NaN or infinite values")
    p = Path(path)
    try:
        p.write_bytes(wav_bytes(data, rate))
    except OSError as e:
        raise AudioError(f"cannot write {p}: {e}") from e


def pcm16(samples: np.ndarray) -> bytes:
    """Mono float samples in [-1, 1] as little-endian 16-bit PCM (values outside are clipped)."""
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim != 1:
        raise AudioError(f"speech output is mono: expected samples [N], got shape {data.shape}")
    if not np.isfinite(data).all():
        raise AudioError("the samples hold NaN or infinite values")
    return np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """A whole 16-bit PCM mono WAV file of ``samples`` (what ``save_wav`` writes)."""
    buf = io.BytesIO()
    pcm = pcm16(samples)
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm)
    return buf.getvalue()


def _as_clip(item: Any, cfg: AudioFeatureConfig, where: str) -> np.ndarray | None:
    """The waveform of an audio content item, or None when the item is not audio."""
    if isinstance(item, np.ndarray):
        return check_waveform(item, None, cfg, where)
    if isinstance(item, dict) and item.get("type") == "audio":
        src = item.get("audio")
        rate = item.get("sampling_rate")
        if isinstance(src, (str, Path)):
            src, file_rate = load_wav(src)
            rate = file_rate if rate is None else rate
            if rate != file_rate:
                raise AudioError(f"{where}: sampling_rate={rate} but the file is {file_rate} Hz")
        if src is None:
            raise AudioError(f"{where}: an audio item needs 'audio': a waveform array or a WAV path")
        return check_waveform(src, rate, cfg, where)
    return None


def extract_audio(conv: list[Any], cfg: AudioFeatureConfig) -> tuple[list[Any], list[np.ndarray]]:
    """Messages with audio items replaced by the audio tag, and the clips in tag order.

    Messages are copied only where they contain audio; the input is never modified.
    """
    clips: list[np.ndarray] = []
    out: list[Any] = []
    for i, msg in enumerate(conv):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, (list, tuple)):
            out.append(msg)
            continue
        items, found = [], False
        for item in content:
            clip = _as_clip(item, cfg, f"message {i}")
            if clip is None:
                items.append(item)
            else:
                found = True
                clips.append(clip)
                items.append(AUDIO_TAG)
        out.append({**msg, "content": items} if found else msg)
    return out, clips


# ---------------------------------------------------------------------------- features


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_part = f >= 1000.0
    return np.where(log_part, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    hz = 200.0 * m / 3.0
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), hz)


@lru_cache(maxsize=4)
def mel_filters(n_fft: int, n_mels: int, sampling_rate: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters [n_fft//2 + 1, n_mels] (float64), 0 Hz..Nyquist."""
    fft_freqs = np.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1)  # [F]
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sampling_rate / 2), n_mels + 2))  # [M+2]
    gaps = np.diff(edges)  # [M+1]
    rel = edges[None, :] - fft_freqs[:, None]  # [F, M+2]
    rising = -rel[:, :-2] / gaps[:-1]  # [F, M]
    falling = rel[:, 2:] / gaps[1:]  # [F, M]
    bank = np.maximum(0.0, np.minimum(rising, falling))  # [F, M]
    return bank * (2.0 / (edges[2:] - edges[:-2]))[None, :]  # [F, M]


@lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)  # periodic, as torch.hann_window


def log_mel(piece: np.ndarray, cfg: AudioFeatureConfig) -> np.ndarray:
    """One <= 30-s piece -> float32 log-mel [n_mels, ceil(len / hop)] (Whisper recipe, see module doc)."""
    n = piece.shape[0]
    if n > cfg.n_samples or n < 1:
        raise InputError(f"a feature piece must hold 1..{cfg.n_samples} samples, got {n}")
    x = np.zeros(cfg.n_samples, dtype=np.float64)
    x[:n] = piece
    half = cfg.n_fft // 2
    padded = np.pad(x, (half, half), mode="reflect")  # [N + n_fft]
    count = cfg.n_samples // cfg.hop_length  # frames kept (the last STFT frame is dropped)
    idx = np.arange(cfg.n_fft)[None, :] + cfg.hop_length * np.arange(count)[:, None]  # [T, n_fft]
    spec = np.fft.rfft(padded[idx] * _hann(cfg.n_fft)[None, :], axis=1)  # [T, F]
    power = spec.real**2 + spec.imag**2  # [T, F]
    mel = power @ mel_filters(cfg.n_fft, cfg.feature_size, cfg.sampling_rate)  # [T, M]
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    feats = ((logm + 4.0) / 4.0).T.astype(np.float32)  # [M, T]
    return np.ascontiguousarray(feats[:, : math.ceil(n / cfg.hop_length)])  # [M, frames]


def clip_features(clip: np.ndarray, cfg: AudioFeatureConfig) -> list[np.ndarray]:
    """The encoder segments of one clip: log-mel [n_mels, frames] per 30-s piece, in order."""
    step = cfg.n_samples
    return [log_mel(clip[i : i + step], cfg) for i in range(0, clip.shape[0], step)]


# ---------------------------------------------------------------------------- placeholders


def audio_token_count(num_samples: int, cfg: AudioFeatureConfig, pool_step: int = 2) -> int:
    """LLM rows for a clip of ``num_samples`` (spec o2.6 §4.7: frames -> /2 conv -> /2 pooling)."""
    frames = math.ceil(num_samples / cfg.hop_length)
    after_conv = (frames - 1) // 2 + 1
    return max((after_conv - pool_step) // pool_step + 1, 0)


def audio_placeholder(num_samples: int, cfg: AudioFeatureConfig, *, chunked: bool = True,
                      pool_step: int = 2) -> str:
    """``<|audio_start|><unk>*n<|audio_end|>`` per ``cfg.chunk_seconds`` of audio (one group if not chunked)."""
    total = audio_token_count(num_samples, cfg, pool_step)
    if not chunked:
        return cfg.audio_start + cfg.unk * total + cfg.audio_end
    frames = int(cfg.chunk_seconds * cfg.sampling_rate / cfg.hop_length)
    per_chunk = ((frames - 1) // 2 + 1 - pool_step) // pool_step + 1  # 25 for 1 s
    parts = []
    for start in range(0, total, per_chunk):
        parts.append(cfg.audio_start + cfg.unk * min(per_chunk, total - start) + cfg.audio_end)
    return "".join(parts)


def expand_audio_tags(prompt: str, clips: list[np.ndarray], cfg: AudioFeatureConfig, *,
                      chunked: bool = True) -> str:
    """Replace the k-th audio tag of ``prompt`` by clip k's placeholder."""
    chunks = prompt.split(AUDIO_TAG)
    if len(chunks) - 1 != len(clips):
        raise InputError(
            f"the prompt has {len(chunks) - 1} '{AUDIO_TAG}' tag(s) but {len(clips)} audio clip(s) were given; "
            "do not type the tag in message text, pass audio as content items"
        )
    parts = [chunks[0]]
    for clip, text in zip(clips, chunks[1:], strict=True):
        parts.append(audio_placeholder(clip.shape[0], cfg, chunked=chunked))
        parts.append(text)
    return "".join(parts)
