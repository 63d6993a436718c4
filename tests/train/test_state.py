"""Training state on disk without pickle (``train/state.py``): optimizer, scheduler and RNG state
round-trip exactly through JSON + safetensors, and loading never unpickles anything."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from minicpmv.errors import CheckpointError
from minicpmv.train.state import load_tree, rng_state, save_tree, set_rng_state

from .conftest import PickleTrap


def _optimizer() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched, params


def _same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b or (a != a and b != b)


def test_optimizer_and_scheduler_state_round_trip_exactly(tmp_path):
    opt, sched, _ = _optimizer()
    tree = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 3}
    save_tree(tree, tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    back = load_tree(tmp_path, "state")
    _same(back, tree)  # int keys, tuples (betas) and tensors come back as they were
    opt2, sched2, _ = _optimizer()
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])


def test_rng_state_round_trips_and_replays_the_same_numbers(tmp_path):
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)
    save_tree(rng_state(), tmp_path, "rng-0")
    want = (torch.rand(4), random.random(), np.random.rand(3))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    set_rng_state(load_tree(tmp_path, "rng-0"))
    got = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


def test_unknown_types_are_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_tree({"x": object()}, tmp_path, "state")


def test_loading_never_unpickles(tmp_path):
    """Only JSON and safetensors are read: a pickle placed where a file is expected is not run."""
    marker = tmp_path / "unpickled"
    save_tree({"a": torch.zeros(2)}, tmp_path, "state")
    (tmp_path / "state.safetensors").write_bytes(pickle.dumps(PickleTrap(marker)))
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_tree(tmp_path, "state")
    assert not marker.exists()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json"):
        load_tree(tmp_path, "state")
    (tmp_path / "state.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="state.json"):
        load_tree(tmp_path, "state")
