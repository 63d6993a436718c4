"""`minicpmv finetune` from the command line: --show-sample, eval data, bf16 autocast, full tuning."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from minicpmv.cli import main

from .conftest import CKPT, qa_records, write_data


def test_finetune_cli_show_sample_eval_bf16(tmp_path, capsys):
    data = write_data(tmp_path / "data", qa_records(2))
    held = write_data(tmp_path / "data", qa_records(1), name="eval.json")
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(CKPT["4.5"]), "--data", str(data), "--eval-data", str(held),
               "--output", str(out), "--max-steps", "1", "--full", "--precision", "bf16", "--show-sample",
               "--no-progress"])
    assert rc == 0
    shown = capsys.readouterr()
    assert "[[red<|im_end|>]]" in shown.out and "<64 image tokens>" in shown.out and "supervised of" in shown.out
    assert "eval loss" in shown.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["eval_loss"] > 0 and metrics["samples_skipped"] == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not (out / "adapter").exists()  # full fine-tuning: no adapter


def test_finetune_cli_reports_library_errors(tmp_path, capsys):
    data = write_data(tmp_path / "data", [{"id": "x", "conversations": [{"role": "user", "content": "q"}]}])
    rc = main(["finetune", "--model", str(CKPT["2.6"]), "--data", str(data), "--output", str(tmp_path / "o")])
    assert rc == 2 and "no assistant message" in capsys.readouterr().err


# ---------------------------------------------------------------------------- output folders (issue 20)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _finetune(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(CKPT["2.6"]), "--data", str(data), "--output", str(out),
            "--max-steps", "2", "--save-every", "1", "--lora-r", "2", "--no-progress", *extra]


def test_finetune_never_overwrites_a_used_output_folder(tmp_path, capsys):
    data = write_data(tmp_path / "data", qa_records(2))
    out = tmp_path / "out"
    assert main(_finetune(data, out)) == 0
    before = _tree(out)
    capsys.readouterr()
    for extra in ([], ["--max-steps", "1"]):  # a longer or a shorter run: both refused, one line each
        assert main(_finetune(data, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not empty" in err and "--resume" in err, err
    assert main(_finetune(data, out, "--resume")) == 2
    assert "has finished" in capsys.readouterr().err
    assert _tree(out) == before  # nothing was touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(_finetune(data, tmp_path / "other", "--resume")) == 2
    assert "does not hold a fine-tuning run" in capsys.readouterr().err


def test_a_run_that_fails_to_start_leaves_no_output_folder(tmp_path, capsys):
    bad = write_data(tmp_path / "data", [{"id": "x", "conversations": [{"role": "user", "content": "q"}]}])
    out = tmp_path / "new" / "out"
    assert main(_finetune(bad, out)) == 2
    assert not out.exists() and not out.parent.exists()
    args = _finetune(bad, tmp_path / "o2")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert main(args) == 2
    assert not (tmp_path / "o2").exists()
    capsys.readouterr()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Weights, adapter and checkpoint files get the mode their neighbours get (safetensors alone
    would write them 0600)."""
    data = write_data(tmp_path / "data", qa_records(2))
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert main(_finetune(data, out)) == 0
        merged = tmp_path / "merged"
        assert main(["export", "--model", str(CKPT["2.6"]), "--adapter", str(out / "adapter"),
                     "--output", str(merged), "--merge-lora"]) == 0
    finally:
        os.umask(old)
    files = [p for folder in (out, merged) for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.parent.name == "step-00000001" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ---------------------------------------------------------------------------- export (issue 20)


@pytest.fixture(scope="module")
def adapter26(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter")
    data = write_data(root / "data", qa_records(2))
    assert main(["finetune", "--model", str(CKPT["2.6"]), "--data", str(data), "--output", str(root / "out"),
                 "--max-steps", "1", "--lora-r", "2", "--no-progress"]) == 0
    return root / "out" / "adapter"


def _export(adapter: Path | str, out: Path, model: Path = CKPT["2.6"]) -> list[str]:
    return ["export", "--model", str(model), "--adapter", str(adapter), "--output", str(out), "--merge-lora"]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("minicpmv: error: ") and err.count("\n") == 1, (rc, err)
    assert "Traceback" not in err
    return err


def test_export_never_overwrites(adapter26, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier model")
    err = _one_line_error(capsys, main(_export(adapter26, out)))
    assert "not empty" in err
    assert (out / "model.safetensors").read_bytes() == b"an earlier model"
    assert main(_export(adapter26, tmp_path / "fresh")) == 0  # an empty or new folder is fine
    assert (tmp_path / "fresh" / "model.safetensors").is_file()


def test_export_with_a_missing_adapter_is_one_line(tmp_path, capsys):
    err = _one_line_error(capsys, main(_export(tmp_path / "nonexistent", tmp_path / "merged")))
    assert "nonexistent" in err and "adapter" in err
    assert not (tmp_path / "merged").exists()


def test_export_with_an_adapter_of_another_base_model_is_one_line(adapter26, tmp_path, capsys):
    """A 2.6 adapter on the 2.5 checkpoint (other layer sizes): one line naming a layer and both
    shapes, instead of pages of size mismatches."""
    other = CKPT["2.6"].parents[1] / "2.5" / "_checkpoint"
    err = _one_line_error(capsys, main(_export(adapter26, tmp_path / "merged", model=other)))
    assert "does not fit" in err and "mlp" in err
    assert not (tmp_path / "merged").exists()


def test_full_disk_during_export_leaves_nothing_half_written(adapter26, tmp_path, capsys, monkeypatch):
    """The disk fills up while the merged weights are written: one line naming the problem, no
    output folder, no partial files left next to it."""
    import errno

    from minicpmv.train import model as tmodel

    real = tmodel.save_safetensors

    def full_disk(tensors, path, **kw):
        real(dict(list(tensors.items())[:3]), path, **kw)  # part of the file made it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tmodel, "save_safetensors", full_disk)
    out = tmp_path / "merged"
    err = _one_line_error(capsys, main(_export(adapter26, out)))
    assert "No space left on device" in err and "merged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("items", ["0", "-3"])
def test_eval_demo_refuses_fewer_than_one_item_per_family(items, capsys):
    assert main(["eval-demo", "--items", items]) == 2
    shown = capsys.readouterr()
    expected = f"minicpmv: error: --items takes the number of items per family, at least 1, not {items}"
    assert shown.err.strip() == expected
    assert "| family |" not in shown.out and "Traceback" not in shown.err
