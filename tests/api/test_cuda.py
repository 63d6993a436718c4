"""On a CUDA device (skipped without one): the issue-16 paths give the reference's answers.

The tiny conformance checkpoints in float32 on the GPU: eager greedy tokens equal the vectors',
the compiled step ("reduce-overhead": CUDA graphs) equals the eager one on every 2.6 / 4.5 case,
the compiled batch engine gives a request the same logits alone and in a batch, a model split
over the GPU and the CPU answers like the unsplit one, weights read straight to the GPU equal a
CPU load, and the vision tower runs through SDPA's flash / memory-efficient kernels.
``bench/gpu_check.sh`` runs this file on a lent GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import minicpmv
from minicpmv.conformance import CaseRunner, expand_case_dirs
from minicpmv.conformance.safetensors_cases import TOL_TENSOR

from .conftest import CONF, case_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [(v, c) for v in ("2.6", "4.5") for c in expand_case_dirs([CONF / v])]
GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def cuda_models():
    """Per version: eager and compiled ChatModels on cuda:0 sharing one set of float32 weights."""
    from minicpmv.engine.chat import ChatModel
    from minicpmv.engine.generate import DecodeMode

    out = {}
    for v in ("2.6", "4.5"):
        eager = minicpmv.load(CONF / v / "_checkpoint", dtype="float32", device="cuda")
        compiled = ChatModel(eager.model, eager.processor, eager.version, eager.config,
                             decode_mode=DecodeMode(compile="reduce-overhead"))
        out[v] = (eager, compiled)
    return out


def _greedy(cm, batch, params):
    with torch.inference_mode():
        steps = list(cm.runner.steps(batch, params))
    return torch.stack([s.tokens for s in steps], 1), torch.stack([s.logits.cpu() for s in steps], 1)


@pytest.mark.parametrize("version,case", CASES, ids=[f"{v}/{c.name}" for v, c in CASES])
def test_cuda_eager_and_graphs_give_the_reference_tokens(version, case, cuda_models):
    eager, compiled = cuda_models[version]
    cases = CaseRunner(eager, case)
    batch, params = cases.greedy_setup()
    tokens, logits = _greedy(eager, batch, params)
    graph_tokens, graph_logits = _greedy(compiled, batch, params)
    want = cases.expected["greedy_ids"]
    assert tokens.tolist() == want[:, : tokens.shape[1]].tolist()
    assert torch.equal(graph_tokens, tokens)
    ref = cases.expected["step_logits"][:, : tokens.shape[1]]
    assert np.abs(graph_logits.numpy() - ref).max() <= TOL_TENSOR
    assert np.abs(logits.numpy() - ref).max() <= TOL_TENSOR


def test_cuda_graph_engine_alone_equals_batched(cuda_models):
    from minicpmv.engine.batch import BatchEngine, BatchRequest
    from minicpmv.engine.sampling import SamplingParams

    eager, compiled = cuda_models["2.6"]
    engine = BatchEngine(compiled, max_batch_size=4, max_model_len=512)
    convs = [[{"role": "user", "content": [f"question {i} " * (i + 1)]}] for i in range(4)]
    convs[1] = [{"role": "user", "content": [case_image("2.6", "single_448"), "What is it?"]}]

    def run(which):
        got = {i: ([], []) for i in which}
        for i in which:
            def sink(e, i=i):
                if e.token_id is not None:
                    got[i][0].append(e.token_id)
                    got[i][1].append(e.logits.cpu())
            engine.submit(BatchRequest(eager.processor([convs[i]]), SamplingParams(max_new_tokens=6 + i), sink,
                                       want_logits=True))
        engine.run_until_idle()
        return got

    alone = {i: run([i])[i] for i in range(4)}
    together = run(range(4))
    for i in range(4):
        assert together[i][0] == alone[i][0]
        assert all(torch.equal(a, b) for a, b in zip(together[i][1], alone[i][1], strict=True))


def test_gpu_cpu_split_answers_like_the_gpu(cuda_models):
    eager, _ = cuda_models["2.6"]
    split = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32",
                          device_map={"": "cuda:0", "llm.model.layers.1": "cpu", "llm.model.norm": "cpu",
                                      "llm.lm_head": "cpu"})
    assert [d.type for d in split.model.layer_devices] == ["cuda", "cpu"]
    msgs = [{"role": "user", "content": [case_image("2.6", "single_448"), "What is in the picture?"]}]
    assert split.chat(msgs, **GREEDY) == eager.chat(msgs, **GREEDY)
    auto = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32", device_map="auto",
                         max_memory={"cuda:0": 6_000_000, "cpu": "1GiB"})  # embeddings, vision, layer 0 fit
    assert [d.type for d in auto.model.layer_devices] == ["cuda", "cpu"]
    assert auto.chat(msgs, **GREEDY) == eager.chat(msgs, **GREEDY)


def test_weights_read_straight_to_the_gpu_equal_a_cpu_load():
    for dtype in ("float32", "bfloat16"):
        gpu = minicpmv.load(CONF / "4.5" / "_checkpoint", dtype=dtype, device="cuda").model.state_dict()
        cpu = minicpmv.load(CONF / "4.5" / "_checkpoint", dtype=dtype).model.state_dict()
        assert set(gpu) == set(cpu)
        for k, t in cpu.items():
            assert gpu[k].device.type == "cuda" and torch.equal(gpu[k].cpu(), t.to(gpu[k].dtype)), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vision_runs_on_fused_attention_kernels(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpu = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype=dtype, device="cuda")
    cpu = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")
    inputs = cpu.processor([[{"role": "user", "content": [case_image("2.6", "single_1344_grid3x3"), "x"]}]])
    pv = [torch.from_numpy(p) for p in inputs.pixel_values[0]]
    sizes = torch.tensor(inputs.tgt_sizes[0])
    with torch.inference_mode():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # no math fallback
            got = gpu.model.encode_images(pv, sizes).float().cpu()
        ref = cpu.model.encode_images(pv, sizes)
    tol = 1e-4 if dtype == "float32" else 5e-2
    assert len(pv) > 1 and (got - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))
