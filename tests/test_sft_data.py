"""SFT data: every supported format gives the token ids and loss mask of a case built by hand from the
Qwen2.5-VL chat template; loss only on assistant spans; segment weights per tagged span; bad rows
named. Plus the pure pieces of the stage: token-budget packing, the LR schedule."""

import io
import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from engine.data import DataError
from engine.learner import Sequence
from engine.learner_group import make_shards, pack_by_tokens
from engine.schedule import lr_at
from engine.sft import load_conversations, to_sequences
from engine.config import load_config
from engine.sft_data import ExampleBuilder, normalise, read_records

IMAGE = "images/train_stain_0064.png"
QUESTION = "Which stain is this?"
TARGET = "<think>Brown membranes.</think><answer>IHC</answer>"
DEFAULT_SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def processor(tiny_model):
    return AutoProcessor.from_pretrained(tiny_model)


def _tok(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _hand_built(processor, demo_data):
    """The expected ids and weights, assembled piece by piece from the template's literal layout;
    pieces meet at special tokens or newlines, where tokenising them apart changes nothing."""
    with Image.open(f"{demo_data}/{IMAGE}") as im:
        grid = processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")["image_grid_thw"][0]
    n_image = int(grid.prod()) // processor.image_processor.merge_size ** 2
    pieces = [(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>", 0.0),
              ("<|image_pad|>" * n_image, 0.0), (f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n", 0.0),
              (TARGET, 1.0), ("<|im_end|>", 1.0), ("\n", 0.0)]
    ids, weights = [], []
    for text, w in pieces:
        t = _tok(processor, text)
        ids += t
        weights += [w] * len(t)
    return ids, weights


def _png_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_every_format_gives_the_hand_built_example(processor, demo_data, tmp_path):
    expected_ids, expected_w = _hand_built(processor, demo_data)
    image_path = f"{demo_data}/{IMAGE}"
    rows = {
        "sharegpt": {"conversations": [{"from": "human", "value": f"<image>{QUESTION}"}, {"from": "gpt", "value": TARGET}],
                     "images": [IMAGE]},
        "sharegpt_system_column": {"conversations": [{"from": "human", "value": f"<image>{QUESTION}"},
                                                     {"from": "gpt", "value": TARGET}],
                                   "images": [IMAGE], "system": DEFAULT_SYSTEM},
        "messages_parts": {"messages": [
            {"role": "user", "content": [{"type": "image", "image": image_path}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": TARGET}]}]},
        "messages_placeholder": {"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                              {"role": "assistant", "content": TARGET}], "images": [IMAGE]},
        "messages_image_url": {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                          + __import__("base64").b64encode(_png_bytes(image_path)).decode()}},
                                         {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": TARGET}]},
        "trl_conversational": {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                               "completion": [{"role": "assistant", "content": TARGET}], "images": [IMAGE]},
        "trl_standard": {"prompt": f"<image>{QUESTION}", "completion": TARGET, "images": [f"file://{image_path}"]},
        "caption": {"image": IMAGE, "caption": TARGET},
        "ours": {"images": [IMAGE], "question": QUESTION, "response": TARGET, "answer": "A"},
    }
    builder = ExampleBuilder(processor, demo_data, {}, 4096)
    reference = None
    for name, row in rows.items():
        conv = normalise(row, name, system_prompt=DEFAULT_SYSTEM, caption_instruction=QUESTION)
        ex = builder.build(conv)
        assert ex.input_ids == expected_ids, name
        assert ex.weights == expected_w, name
        if reference is None:
            reference = ex.pixel_values
        assert torch.equal(ex.pixel_values, reference), name

    custom = builder.build(normalise({**rows["sharegpt"], "system": "Be terse."}, "sys", DEFAULT_SYSTEM, ""))
    assert processor.tokenizer.decode(custom.input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")

    # parquet, images as bytes structs (Hugging Face datasets' Image feature) and as paths
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"conversations": rows["sharegpt"]["conversations"], "images": [{"bytes": _png_bytes(image_path), "path": None}]},
        {"conversations": rows["sharegpt"]["conversations"], "images": [{"bytes": None, "path": image_path}]}])
    pq.write_table(table, tmp_path / "sft.parquet")
    cfg = load_config(None, ["data.system_prompt=x"])
    convs, skipped = load_conversations(str(tmp_path / "sft.parquet"), cfg)
    assert not skipped and [c.where for c in convs] == [f"{tmp_path}/sft.parquet:row 0", f"{tmp_path}/sft.parquet:row 1"]
    for conv in convs:
        ex = builder.build(conv)
        assert ex.input_ids == expected_ids and ex.weights == expected_w
        assert torch.equal(ex.pixel_values, reference)


def test_multi_turn_multi_image_loss_only_on_assistant_spans(processor, demo_data):
    row = {"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>Stain?"}, {"from": "gpt", "value": "IHC"},
        {"from": "human", "value": "And this one <image>?"}, {"from": "gpt", "value": "H&E"}],
        "images": [IMAGE, "images/train_stain_0053.png"]}
    ex = ExampleBuilder(processor, demo_data, {}, 4096).build(normalise(row, "mt", "", ""))
    trained = [t for t, w in zip(ex.input_ids, ex.weights) if w > 0]
    assert processor.tokenizer.decode(trained) == "IHC<|im_end|>H&E<|im_end|>"
    assert ex.image_grid_thw.shape[0] == 2
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ex.input_ids.count(image_id) == int(ex.image_grid_thw.prod(-1).sum()) // 4
    (seq,), images = to_sequences([ex])
    # the second image's placeholders lie in the "response" (after the first target): real, not text
    assert seq.vision_in_response and image_id in seq.response_ids and len(images) == 1
    assert seq.loss_weights[-1] == 1.0 and len(seq.loss_weights) == len(seq.response_ids)


def test_messages_without_image_markers_take_the_images_first_as_trl(processor, demo_data):
    """TRL's prepare_multimodal_messages: string content and an `images` column give the images before
    the first user text; LLaMA-Factory's `system` column applies to `messages` rows too."""
    plain = {"messages": [{"role": "user", "content": "Stain?"}, {"role": "assistant", "content": "IHC"}],
             "images": [IMAGE], "system": "Be brief."}
    marked = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Stain?"}]},
                           {"role": "assistant", "content": "IHC"}], "images": [IMAGE]}
    builder = ExampleBuilder(processor, demo_data, {}, 4096)
    a, b = (builder.build(normalise(row, "m", "", "")) for row in (plain, marked))
    assert a.input_ids == b.input_ids and a.weights == b.weights
    assert torch.equal(a.pixel_values, b.pixel_values)


def test_prompt_completion_trains_the_completion_only(processor, demo_data):
    """TRL's completion_only_loss: an assistant turn inside `prompt` is context, never a target."""
    row = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Stain?"}]},
                      {"role": "assistant", "content": "IHC"}, {"role": "user", "content": "Sure?"}],
           "completion": [{"role": "assistant", "content": "Yes, brown DAB."}], "images": [IMAGE]}
    ex = ExampleBuilder(processor, demo_data, {}, 4096).build(normalise(row, "pc", "", ""))
    trained = [t for t, w in zip(ex.input_ids, ex.weights) if w > 0]
    assert processor.tokenizer.decode(trained) == "Yes, brown DAB.<|im_end|>"


def test_segment_weights_per_span(processor, demo_data):
    row = {"conversations": [{"from": "human", "value": "<image>Q"},
                             {"from": "gpt", "value": "<observe>brown</observe><think>so IHC</think><answer>A</answer>"}],
           "images": [IMAGE]}
    ex = ExampleBuilder(processor, demo_data, {"observe": 0.0, "think": 0.5, "answer": 1.0}, 4096).build(
        normalise(row, "seg", "", ""))
    by_weight = {}
    for t, w in zip(ex.input_ids, ex.weights):
        by_weight.setdefault(w, []).append(t)
    decode = processor.tokenizer.decode
    # A token straddling two spans takes the larger weight: "><" closes <observe> and opens <think>,
    # and "><" again between </think> and <answer>.
    assert decode(by_weight[1.0]) == "><answer>A</answer><|im_end|>"
    assert decode(by_weight[0.5]).startswith("><think>so IHC</think")
    assert "brown" not in decode(by_weight[0.5] + by_weight[1.0])


@pytest.mark.parametrize("row,weights,problem", [
    ({"conversations": [{"from": "human", "value": "<image><image>Q"}, {"from": "gpt", "value": "A"}],
      "images": [IMAGE]}, {}, "more <image> placeholders than images"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "images": [IMAGE]}, {},
     "1 images but 0 image placeholders"),
    ({"conversations": [{"from": "human", "value": "<image>Q"}], "images": [IMAGE]}, {}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]}, {}, "unknown speaker 'robot'"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<plan>x</plan>A"}]},
     {"think": 1.0}, "tag <plan>, which sft.segment_weights does not name"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "<think>x"}]},
     {"think": 1.0}, "<think> is never closed"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "long " * 300}]}, {},
     "longer than sft.max_length=64"),
    ({"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
      "images": [{"bytes": b"not a png", "path": None}]}, {}, "cannot be decoded"),
    ({"question": "Q", "answer": "A"}, {}, "no known format"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "  "}]}, {},
     "turn 1: the assistant turn is empty"),
    ({"prompt": [{"role": "user", "content": "Q"}], "completion": []}, {}, "'completion' must be one or more assistant"),
    ({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]}, {}, "both be strings or both be message"),
    ({"caption": "x", "image": "https://example.org/a.png"}, {}, "remote images are not downloaded"),
])
def test_bad_rows_are_named(processor, demo_data, row, weights, problem):
    with pytest.raises(DataError) as e:
        ExampleBuilder(processor, demo_data, weights, 64).build(normalise(row, "data.jsonl:7", "", ""))
    assert problem in str(e.value) and "data.jsonl:7" in str(e.value)


def test_bad_rows_skipped_with_file_and_line_or_fatal(tmp_path):
    path = tmp_path / "sft.jsonl"
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    path.write_text(json.dumps(good) + "\n{broken\n" + json.dumps({"messages": []}) + "\n")
    convs, skipped = load_conversations(str(path), load_config(None))
    assert len(convs) == 1 and len(skipped) == 2
    assert f"{path}:2: not valid JSON" in skipped[0] and f"{path}:3" in skipped[1]
    with pytest.raises(DataError, match=f"{path}:2"):
        load_conversations(str(path), load_config(None, ["data.bad_rows=fatal"]))
    assert [w for w, _ in read_records(str(path))] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_token_budget_packing():
    def alone(lengths):  # one row per sequence: (own key, prompt 1, the rest response)
        return [(i, 1, n - 1) for i, n in enumerate(lengths)]

    assert pack_by_tokens(alone([3, 3, 4, 4, 9]), 12) == [3, 1, 1]  # 3x4=12 fits, then 4+9 → 2x9 > 12
    assert pack_by_tokens(alone([20, 2]), 10) == [1, 1]             # longer than the budget: alone, not dropped
    seqs = [Sequence(prompt_ids=[1] * p, response_ids=[2] * r, loss_weights=[0.5] * r)
            for p, r in [(5, 1), (5, 7), (2, 2), (9, 9), (1, 1)]]
    shards = make_shards(seqs, [], world_size=2, micro_batch_size=8, max_tokens=20)
    assert sorted(i for s in shards for i in s.index) == list(range(5))
    assert len({len(s.micro_sizes) for s in shards}) == 1            # every rank: the same number of micro-batches
    for s in shards:
        assert sum(s.micro_sizes) == len(s.sequences) and s.num_tokens == 0.5 * 20
        start = 0
        for size in s.micro_sizes:
            mb = s.sequences[start:start + size]
            start += size
            longest = max((len(q.prompt_ids) + len(q.response_ids) for q in mb), default=0)
            assert size <= 1 or size * longest <= 20


def test_lr_schedule():
    assert lr_at(1, 10, 1.0, "cosine", warmup_steps=4) == 0.25
    assert lr_at(4, 10, 1.0, "cosine", warmup_steps=4) == 1.0
    assert lr_at(10, 10, 1.0, "cosine", warmup_steps=4, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(7, 10, 2.0, "cosine", warmup_steps=4) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(9, 10, 2.0, "constant", warmup_steps=4) == 2.0
    with pytest.raises(ValueError, match="linear"):
        lr_at(1, 10, 1.0, "linear")


def test_image_bytes_roundtrip(processor, demo_data):
    """Raw bytes in a jsonl-less row (e.g. from a datasets Arrow table) load like the file."""
    with Image.open(f"{demo_data}/{IMAGE}") as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    row = {"caption": "x", "images": [buf.getvalue()]}
    ex = ExampleBuilder(processor, demo_data, {}, 4096).build(normalise(row, "b", "", "Describe."))
    ref = ExampleBuilder(processor, demo_data, {}, 4096).build(normalise({"caption": "x", "image": IMAGE}, "p", "", "Describe."))
    assert torch.equal(ex.pixel_values, ref.pixel_values) and ex.input_ids == ref.input_ids
