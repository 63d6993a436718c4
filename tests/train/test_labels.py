"""Label masks per version template, image markers, and the no-truncation-inside-images rule."""

from __future__ import annotations

import pytest

from minicpmv.errors import InputError
from minicpmv.train.data import IGNORE, LabelBuilder, build_dataset, build_sample, record_to_messages
from minicpmv.train.model import collate

from .conftest import write_data


def _supervised(chat, sample) -> list[str]:
    """The decoded runs of supervised tokens, in order."""
    runs, cur = [], []
    for t, lab in zip(sample.input_ids, sample.labels, strict=True):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(chat.tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(chat.tokenizer.decode(cur))
    return runs


def _one(chat, tmp_path, record, max_length=4096):
    path = write_data(tmp_path, [record])
    return build_sample(chat.processor, LabelBuilder(chat.processor), record, path.parent, max_length)


MULTI = {"id": "m", "image": "a.png", "conversations": [
    {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]}


def test_labels_26_multi_turn(chat26, tmp_path):
    s = _one(chat26, tmp_path, MULTI)
    assert _supervised(chat26, s) == ["Red.<|im_end|>", "Yes<|im_end|>"]
    text = chat26.tokenizer.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image_id>0")
    assert text.endswith("<|im_start|>assistant\nYes<|im_end|>\n")  # the whole template, no generation prompt
    # the lone image went before the first user text, as the official code does
    assert "</image>\nWhat colour?<|im_end|>" in text
    assert len(s.bounds) == 1 and all(lab == IGNORE for lab in s.labels[s.bounds[0][0] : s.bounds[0][1]])


def test_labels_45_without_thinking(chat45, tmp_path):
    s = _one(chat45, tmp_path, MULTI)
    # the last turn carries the empty thinking block of enable_thinking=False: it is prompt, not label
    assert _supervised(chat45, s) == ["Red.<|im_end|>", "Yes<|im_end|>"]
    text = chat45.tokenizer.decode(s.input_ids)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nYes<|im_end|>\n")
    assert not text.startswith("<|im_start|>system")  # 4.5's template has no default system message


def test_labels_45_with_thinking_and_system(chat45, tmp_path):
    rec = {"id": "t", "image": {"<image_00>": "a.png", "<image_01>": "b.png"}, "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image_00>\nvs\n<image_01>\nsame?"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nNo"}]}
    s = _one(chat45, tmp_path, rec)
    assert _supervised(chat45, s) == ["hmm\n</think>\n\nNo<|im_end|>"]  # after the "<think>\n" prompt
    text = chat45.tokenizer.decode(s.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert len(s.bounds) == 2 and text.index("<image_id>0") < text.index("vs") < text.index("<image_id>1")


def test_labels_26_thinking_text_is_plain_answer(chat26, tmp_path):
    rec = {"id": "t", "conversations": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "<think>x</think>ok"}]}
    s = _one(chat26, tmp_path, rec)
    assert _supervised(chat26, s) == ["<think>x</think>ok<|im_end|>"]
    assert s.pixel_values == [] and s.bounds == []


def test_marker_errors(tmp_path):
    bad = {"id": "x", "image": "a.png", "conversations": [{"role": "user", "content": "<image_03> hi"},
                                                          {"role": "assistant", "content": "a"}]}
    write_data(tmp_path, [bad])
    with pytest.raises(InputError, match="image_03"):
        record_to_messages(bad, tmp_path)
    no_answer = {"id": "y", "conversations": [{"role": "user", "content": "hi"}]}
    with pytest.raises(InputError, match="assistant"):
        record_to_messages(no_answer, tmp_path)


def test_truncation_inside_image_is_skipped_and_counted(chat26, tmp_path):
    long_text = {"id": "long_text", "image": "a.png", "conversations": [
        {"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "word " * 60}]}
    short = {"id": "short", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    image_late = {"id": "image_late", "image": "a.png", "conversations": [
        {"role": "user", "content": "word " * 40 + "<image>"}, {"role": "assistant", "content": "a"}]}
    path = write_data(tmp_path, [long_text, short, image_late])
    samples, stats = build_dataset(chat26.processor, path, max_length=100, max_skip_ratio=0.5)
    assert (stats.total, stats.skipped, stats.skipped_ids) == (3, 1, ["image_late"])
    cut = samples[0]
    assert cut.id == "long_text" and len(cut.input_ids) == 100 and cut.bounds[0][1] <= 100  # text-only cut
    with pytest.raises(InputError, match="1 of 3 samples"):
        build_dataset(chat26.processor, path, max_length=100, max_skip_ratio=0.2)


def test_collate_counts_shifted_labels(chat26, tmp_path):
    s = _one(chat26, tmp_path, MULTI)
    batch = collate([s, s])
    assert batch["n_tokens"] == 2 * s.n_supervised
    assert batch["ids"].shape == batch["labels"].shape == (2, len(s.input_ids))
