"""Dataset rows → prompts: schema checks with file:line errors, skipping vs fatal bad rows, the
Patho-R1 prompt through the real Qwen2.5-VL chat template and image processor."""

import json
import shutil

import pytest
from transformers import AutoProcessor

from engine.config import PATHO_R1_SYSTEM_PROMPT
from engine.data import DataError, PromptBuilder, PromptStream, load_rows

IMAGE_PAD = 151655


@pytest.fixture(scope="module")
def processor(tiny_model):
    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture()
def dataset(tmp_path, demo_data):
    (tmp_path / "img").mkdir()
    first = json.loads(open(f"{demo_data}/train.jsonl").readline())
    shutil.copy(f"{demo_data}/{first['images'][0]}", tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"id": "good", "images": ["img/ok.png"], "question": "Stain?", "options": ["H&E", "IHC"], "answer": "b"},
        {"id": "text-answer", "image": "img/ok.png", "question": "Stain?", "options": ["H&E", "IHC"], "answer": "IHC"},
        {"id": "open", "images": [], "question": "Describe.", "answer": "glands", "entities": ["gland"]},
        "not an object",
        {"id": "no-question", "images": ["img/ok.png"], "options": ["a", "b"], "answer": "A"},
        {"id": "bad-letter", "images": ["img/ok.png"], "question": "Q?", "options": ["a", "b"], "answer": "C"},
        {"id": "missing-image", "images": ["img/nope.png"], "question": "Q?", "answer": "x"},
        {"id": "good", "images": ["img/ok.png"], "question": "dup", "answer": "x"},
        {"id": "broken-image", "images": ["img/broken.png"], "question": "Q?", "options": ["a", "b"], "answer": "A"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{truncated json\n")
    return path


def test_bad_rows_are_skipped_with_file_and_line(dataset):
    rows, skipped = load_rows(str(dataset))
    assert [r["id"] for r in rows] == ["good", "text-answer", "open", "broken-image"]
    assert rows[0]["answer"] == "B" and rows[1]["answer"] == "B" and rows[1]["images"][0].endswith("img/ok.png")
    assert rows[2]["entities"] == ["gland"]
    expected = {4: "expected a JSON object", 5: "'question' must be a non-empty string", 6: "neither a letter A-B",
                7: "nope.png does not exist", 8: "duplicate id 'good'", 10: "not valid JSON"}
    assert len(skipped) == len(expected)
    for (line, what), message in zip(sorted(expected.items()), skipped):
        assert f"rows.jsonl:{line}:" in message and what in message, message


def test_bad_rows_fatal_names_the_row(dataset):
    with pytest.raises(DataError, match=r"rows\.jsonl:4: expected a JSON object"):
        load_rows(str(dataset), bad_rows="fatal")


def test_patho_r1_prompt_with_image(dataset, processor):
    rows, _ = load_rows(str(dataset))
    prompt = PromptBuilder(processor, PATHO_R1_SYSTEM_PROMPT, 512).build(rows[0])
    assert prompt.text.startswith(f"<|im_start|>system\n{PATHO_R1_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                                  "<|vision_start|><|image_pad|><|vision_end|>Stain?\nA. H&E\nB. IHC<|im_end|>\n")
    assert prompt.text.endswith("<|im_start|>assistant\n")
    # The processor expands the one placeholder to (grid patches / 2x2 merge) image tokens.
    grid = prompt.image_grid_thw
    assert grid.tolist() == [[1, 16, 16]] and prompt.pixel_values.shape[0] == 256
    assert prompt.prompt_ids.count(IMAGE_PAD) == 64
    assert prompt.images[0].mode == "RGB" and prompt.images[0].size == (224, 224)


def test_undecodable_image_and_long_prompt_are_skipped_or_fatal(dataset, processor):
    rows, _ = load_rows(str(dataset))
    by_id = {r["id"]: r for r in rows}
    stream = PromptStream([by_id["broken-image"], by_id["good"]], PromptBuilder(processor, "sys", 512), shuffle=False)
    assert [p.uid for p in stream.take(3)] == ["good", "good", "good"]
    assert len(stream.skipped) == 1 and "broken.png cannot be decoded" in stream.skipped[0]
    fatal = PromptStream([by_id["broken-image"]], PromptBuilder(processor, "sys", 512), bad_rows="fatal")
    with pytest.raises(DataError, match=r"rows\.jsonl:9: image .*broken\.png cannot be decoded"):
        fatal.take(1)
    with pytest.raises(DataError, match=r"prompt is \d+ tokens .* longer than data.max_prompt_tokens=20"):
        PromptBuilder(processor, "sys", 20).build(by_id["good"])


def test_stream_epochs_cover_every_row_and_skip_solved(demo_data, processor):
    rows, _ = load_rows(f"{demo_data}/val.jsonl")
    rows = rows[:6]
    stream = PromptStream(rows, PromptBuilder(processor, "sys", 512), seed=3, skip_solved_epochs=1)
    first = [p.uid for p in stream.take(6)]
    assert sorted(first) == sorted(r["id"] for r in rows) and stream.epoch == 0
    stream.record_pass_rate(first[0], [1.0, 1.0, 1.0])   # solved: skipped during the next epoch
    stream.record_pass_rate(first[1], [0.0, 1.0, 1.0])   # informative: kept
    second = [p.uid for p in stream.take(5)]
    assert stream.epoch == 1 and first[0] not in second and sorted(second) == sorted(first[1:])
    third = [p.uid for p in stream.take(6)]
    assert sorted(third) == sorted(first) and stream.skipped_solved == 1


def test_stream_serves_solved_rows_when_nothing_else_is_left(demo_data, processor):
    rows, _ = load_rows(f"{demo_data}/val.jsonl")
    rows = rows[:3]
    stream = PromptStream(rows, PromptBuilder(processor, "sys", 512), seed=3, skip_solved_epochs=2)
    for p in stream.take(3):
        stream.record_pass_rate(p.uid, [0.0, 0.0])  # every row all wrong: all skipped next epochs
    again = [p.uid for p in stream.take(3)]
    assert sorted(again) == sorted(r["id"] for r in rows) and stream.skipped_solved >= 3
