"""bench/bench_gpu.py is not dead code: its smoke mode runs every step on a tiny checkpoint on the
CPU, the real-size layouts it builds have the release parameter counts, and without CUDA it
refuses in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_gpu():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_gpu

        yield bench_gpu
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("version,params", [("2.6", 8.10e9), ("4.5", 8.70e9)])
def test_real_size_layouts(bench_gpu, version, params) -> None:
    from minicpmv.config import ModelConfig
    from minicpmv.loading import count_parameters
    from minicpmv.versions import detect_version

    raw, side = bench_gpu.version_source(version, tiny=False)
    assert (side / "tokenizer_config.json").is_file() or (side / "vocab.json").is_file()
    cfg = ModelConfig.from_hf_dict(raw, **detect_version(raw).config_kwargs())
    total = count_parameters(cfg)["total"]
    assert abs(total - params) / params < 0.01, total  # MiniCPM-V 2.6: 8.1 B, 4.5: 8.7 B
    assert cfg.text.num_hidden_layers == (28 if version == "2.6" else 36)  # full depth


def test_smoke_run_on_the_cpu(bench_gpu, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = bench_gpu.main(["--tiny", "--device", "cpu", "--versions", "2.6", "--modes", "static",
                         "--concurrency", "1", "2", "--new-tokens", "3", "--warmup-tokens", "2", "--image-size", "448",
                         "--second-turns", "2", "--second-tokens", "2", "--cache-dir", str(tmp_path / "ckpt"),
                         "--json", str(out)])
    assert rc == 0
    run = json.loads(out.read_text())["versions"]["2.6"]["runs"]["static"]
    assert not [k for k in run if k.endswith("_error")], run
    assert run["tokens"] == 3 and run["decode_tok_s"] > 0 and len(run["second_ttft_all_s"]) == 2
    conc = run["concurrency"]
    assert conc["exact_2"]["first_bit_identical"] and conc["fast_2"]["tok_s"] > 0
    assert (tmp_path / "ckpt" / "tiny-2.6-s0-f1" / "model.safetensors.index.json").is_file()
    table = capsys.readouterr().out
    assert "time to first token" in table and "2 conversations" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda(bench_gpu, capsys) -> None:
    assert bench_gpu.main([]) == 2
    assert bench_gpu.main(["--device", "cpu"]) == 2  # a real-size model only on a GPU
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "none is visible" in err[0] and "--tiny" in err[1]
