"""Training data in the ecosystem's formats, read lazily: verl-, TRL- and EasyR1-schema rows (parquet,
a Hugging Face save_to_disk folder, parquet shards, jsonl) made from the demo rows give the prompts,
token ids and ground truths of the demo jsonl; images as bytes and as paths; extra_info reaches a
verl reward; bad inputs are named by file, row and column; memory stays bounded on a large dataset."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoProcessor

from engine.config import PATHO_R1_SYSTEM_PROMPT, DataConfig
from engine.data import DataError, Prompt, PromptBuilder, PromptStream, load_rows, open_rows
from engine.preflight import open_train
from rewards import RewardInput, RewardRunner, RewardSpec

N = 6  # demo rows per dataset
ROOT = Path(__file__).resolve().parents[1]


class Stub:
    """A prompt builder without a processor: the stream's own behaviour."""

    def build(self, row: dict) -> Prompt:
        return Prompt(uid=row["id"], row=row, text="", images=[], prompt_ids=[], pixel_values=None,
                      image_grid_thw=None)


@pytest.fixture(scope="module")
def processor(tiny_model):
    return AutoProcessor.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def demo(demo_data):
    with open(f"{demo_data}/train.jsonl") as f:
        return [json.loads(line) for line in f][:N]


def _user_text(row: dict) -> str:
    """The demo row's user text, written out independently of rewards.format_prompt."""
    return row["question"] + "".join(f"\n{letter}. {option}" for letter, option in zip("ABCDEFGH", row["options"]))


def _verl(row: dict, image) -> dict:
    """A row as verl's preprocessing scripts write it (examples/data_preprocess/geo3k.py), with the
    system turn in the chat list."""
    return {"data_source": row["data_source"],
            "prompt": [{"role": "system", "content": PATHO_R1_SYSTEM_PROMPT},
                       {"role": "user", "content": "<image>" + _user_text(row)}],
            "images": [image], "ability": "pathology",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"split": "train", "index": int(row["id"].rsplit("-", 1)[1]), "question": row["question"]}}


def _trl(row: dict, image) -> dict:
    """A row of a TRL GRPOTrainer vision dataset: a conversational prompt with an image part, the
    image in its own column, the ground truth in `solution` (what TRL's accuracy_reward reads)."""
    return {"prompt": [{"role": "system", "content": [{"type": "text", "text": PATHO_R1_SYSTEM_PROMPT}]},
                       {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _user_text(row)}]}],
            "image": image, "solution": row["answer"]}


def _easyr1(row: dict, image) -> dict:
    return {"problem": "<image>" + _user_text(row), "answer": row["answer"], "images": [image]}


def _save_to_disk(table: pa.Table, folder) -> None:
    """What datasets.Dataset.save_to_disk writes (datasets is not a dependency): an Arrow IPC stream
    file, dataset_info.json and a state.json listing the data files."""
    folder.mkdir()
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=4):
            writer.write_batch(batch)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_fingerprint": "x",
                                                   "_format_type": None, "_split": "train"}))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, demo, demo_data):
    """The demo rows in every format; image bytes read from the demo's files, paths relative to a copy."""
    tmp = tmp_path_factory.mktemp("formats")
    (tmp / "images").mkdir()
    for row in demo:
        shutil.copy(f"{demo_data}/{row['images'][0]}", tmp / "images")
    as_bytes = [open(f"{demo_data}/{r['images'][0]}", "rb").read() for r in demo]
    as_paths = [f"images/{os.path.basename(r['images'][0])}" for r in demo]
    out = {}
    structs = [{"bytes": b, "path": None} for b in as_bytes]  # datasets' Image feature
    pq.write_table(pa.Table.from_pylist([_verl(r, b) for r, b in zip(demo, structs)]), tmp / "verl.parquet")
    out["verl parquet, image structs"] = tmp / "verl.parquet"
    pq.write_table(pa.Table.from_pylist([_easyr1(r, p) for r, p in zip(demo, as_paths)]), tmp / "easyr1.parquet")
    out["easyr1 parquet, paths"] = tmp / "easyr1.parquet"
    _save_to_disk(pa.Table.from_pylist([_easyr1(r, b) for r, b in zip(demo, as_bytes)]), tmp / "easyr1_hf")
    out["easyr1 save_to_disk, bytes"] = tmp / "easyr1_hf"
    (tmp / "shards").mkdir()
    for k, part in enumerate((range(2), range(2, N))):
        shard = [_verl(demo[i], {"bytes": None, "path": str(tmp / as_paths[i])}) for i in part]
        pq.write_table(pa.Table.from_pylist(shard), tmp / "shards" / f"train-0000{k}-of-00002.parquet")
    out["verl parquet shards, absolute paths"] = tmp / "shards"
    with open(tmp / "mixed.jsonl", "w") as f:
        for k, (r, p) in enumerate(zip(demo, as_paths)):
            f.write(json.dumps(_verl(r, p) if k % 2 else _easyr1(r, p)) + "\n")
    out["verl + easyr1 jsonl, paths"] = tmp / "mixed.jsonl"
    pq.write_table(pa.Table.from_pylist([_trl(r, b) for r, b in zip(demo, structs)]), tmp / "trl.parquet")
    out["trl parquet, image column"] = tmp / "trl.parquet"
    return out


@pytest.fixture(scope="module")
def expected(demo, demo_data, processor):
    """(text, ids, answer) per demo row, from the chat template and processor directly."""
    out = []
    for row in demo:
        messages = [{"role": "system", "content": PATHO_R1_SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _user_text(row)}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = Image.open(f"{demo_data}/{row['images'][0]}").convert("RGB")
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        out.append((text, ids, row["answer"]))
    return out


def test_demo_jsonl_matches_the_independent_prompts(demo_data, processor, expected):
    rows, _ = load_rows(f"{demo_data}/train.jsonl")
    builder = PromptBuilder(processor, PATHO_R1_SYSTEM_PROMPT, 512)
    assert [(p.text, p.prompt_ids, p.row["answer"]) for p in map(builder.build, rows[:N])] == expected


@pytest.mark.parametrize("kind", ["verl parquet, image structs", "easyr1 parquet, paths", "easyr1 save_to_disk, bytes",
                                  "verl parquet shards, absolute paths", "verl + easyr1 jsonl, paths",
                                  "trl parquet, image column"])
def test_ecosystem_rows_give_the_demo_prompts(kind, datasets, processor, expected):
    rows, skipped = load_rows(str(datasets[kind]))
    assert skipped == [] and len(rows) == N
    builder = PromptBuilder(processor, PATHO_R1_SYSTEM_PROMPT, 512)
    prompts = [builder.build(row) for row in rows]
    assert [(p.text, p.prompt_ids, p.row["answer"]) for p in prompts] == expected
    assert all(p.images[0].mode == "RGB" and p.images[0].size == (224, 224) for p in prompts)
    for p in prompts:  # what reaches the rewards and the rollout records: no image bytes
        assert all(isinstance(ref, str) and len(ref) < 300 for ref in p.row["images"])


def test_ids_and_questions_of_ecosystem_rows(datasets, demo):
    folder = datasets["verl parquet shards, absolute paths"]
    rows, _ = load_rows(str(folder))
    first, second = (folder / name for name in sorted(os.listdir(folder)))
    assert [r["id"] for r in rows] == [f"{first}:row 0", f"{first}:row 1"] + [f"{second}:row {i}" for i in range(N - 2)]
    assert [r["question"] for r in rows] == [_user_text(r) for r in demo]
    assert all(r["options"] == [] and r["data_source"] == d["data_source"] for r, d in zip(rows, demo))


def test_verl_row_takes_its_own_chat_list_without_adding_a_system_prompt(processor, demo, datasets):
    row = _verl(demo[0], "images/" + os.path.basename(demo[0]["images"][0]))
    row["prompt"] = row["prompt"][1:]  # no system message: verl adds none, the chat template's default applies
    path = datasets["verl + easyr1 jsonl, paths"].parent / "no_system.jsonl"
    path.write_text(json.dumps(row) + "\n")
    text = PromptBuilder(processor, PATHO_R1_SYSTEM_PROMPT, 512).chat_text(load_rows(str(path))[0][0])
    assert PATHO_R1_SYSTEM_PROMPT not in text
    assert text == processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _user_text(demo[0])}]}],
        add_generation_prompt=True, tokenize=False)


def test_easyr1_format_prompt_and_no_system_prompt(processor, demo, datasets):
    rows, _ = load_rows(str(datasets["easyr1 parquet, paths"]))
    template = "{{ content | trim }} Put the letter in <answer> </answer>."
    text = PromptBuilder(processor, "", 512, format_prompt=template).chat_text(rows[0])
    user = [{"type": "image"}, {"type": "text", "text": _user_text(demo[0]) + " Put the letter in <answer> </answer>."}]
    assert text == processor.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                 tokenize=False)


def test_extra_info_reaches_a_verl_reward(tmp_path, datasets, processor, demo):
    reward = tmp_path / "verl_reward.py"
    reward.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    assert set(extra_info) == {'split', 'index', 'question'}, extra_info\n"
        "    return {'score': float(solution_str == ground_truth), 'index': float(extra_info['index'])}\n")
    rows, _ = load_rows(str(datasets["verl parquet, image structs"]))
    prompts = [PromptBuilder(processor, "", 512).build(row) for row in rows[:3]]
    inputs = [RewardInput.from_row(k, {key: v for key, v in p.row.items() if not key.startswith("_")}, "A")
              for k, p in enumerate(prompts)]
    with RewardRunner([RewardSpec("acc", f"{reward}:compute_score")], num_workers=1) as runner:
        batch = runner.score(inputs)
    assert batch.errors == []
    assert batch.metrics["acc/index"] == [float(d["id"].rsplit("-", 1)[1]) for d in demo[:3]]
    assert batch.components["acc"] == [float(d["answer"] == "A") for d in demo[:3]]


def test_trl_rows_reach_a_trl_reward_as_in_trl(datasets, processor, demo, tmp_path):
    """TRL's accuracy_reward pattern: completions as message lists, the `solution` column as a keyword."""
    rows, _ = load_rows(str(datasets["trl parquet, image column"]))
    prompts = [PromptBuilder(processor, "", 512).build(row) for row in rows]
    inputs = [RewardInput.from_row(k, {key: v for key, v in p.row.items() if not key.startswith("_")}, "A")
              for k, p in enumerate(prompts)]
    (tmp_path / "trl_accuracy.py").write_text(
        "def accuracy_reward(completions, solution, **kwargs):\n"
        "    return [float(c[0]['content'] == s) for c, s in zip(completions, solution)]\n")
    with RewardRunner([RewardSpec("acc", f"{tmp_path}/trl_accuracy.py:accuracy_reward")], num_workers=1) as runner:
        batch = runner.score(inputs)
    assert batch.errors == [] and batch.components["acc"] == [float(d["answer"] == "A") for d in demo]


def test_verl_rows_as_verl_and_trl_hand_them_to_rewards(tmp_path, demo, datasets, processor):
    """What verl's NaiveRewardManager and rl_dataset pass (reward_model.ground_truth as stored, {}
    for a null extra_info) and what TRL's GRPOTrainer passes for a chat prompt (the messages, and
    [{"role": "assistant", "content": …}] completions, the "prompt" column left out): a parquet whose
    ground truths are numbers (a float column, as nulls make it), ids partly null, extra_info partly
    null and, in a second file, stored as an Arrow map."""
    image = {"bytes": None, "path": str(datasets["verl + easyr1 jsonl, paths"].parent / "images" /
                                         os.path.basename(demo[0]["images"][0]))}
    rows = [{**_verl(demo[0], image), "reward_model": {"style": "rule", "ground_truth": truth}, "id": uid,
             "extra_info": info} for truth, uid, info in ((42.0, "a", {"split": "train"}), (None, None, None),
                                                          (7.5, None, None))]
    rows[1]["reward_model"]["ground_truth"] = 3.0
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert pa.parquet.read_schema(path).field("id").type == pa.string()
    loaded, skipped = load_rows(str(path))
    assert skipped == [] and [r["id"] for r in loaded] == ["a", f"{path}:row 1", f"{path}:row 2"]
    assert [r["answer"] for r in loaded] == ["42", "3", "7.5"]  # integral floats as integers
    (tmp_path / "rewards.py").write_text(
        "def verl_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    assert isinstance(extra_info, dict), extra_info\n"
        "    return float(int(solution_str) == ground_truth) + (0.5 if extra_info else 0.0)\n"
        "def trl_reward(prompts, completions, **kwargs):\n"
        "    assert 'prompt' not in kwargs and all(p[-1]['role'] == 'user' for p in prompts)\n"
        "    return [float(c[0]['role'] == 'assistant' and c[0]['content'] == '42') for c in completions]\n")
    prompts = [PromptBuilder(processor, "", 512).build(row) for row in loaded]
    inputs = [RewardInput.from_row(k, {key: v for key, v in p.row.items() if not key.startswith("_")}, "42")
              for k, p in enumerate(prompts)]
    specs = [RewardSpec("verl", f"{tmp_path}/rewards.py:verl_score"), RewardSpec("trl", f"{tmp_path}/rewards.py:trl_reward")]
    with RewardRunner(specs, num_workers=1) as runner:
        batch = runner.score(inputs)
    assert batch.errors == []
    assert batch.components["verl"] == [1.5, 0.0, 0.0] and batch.components["trl"] == [1.0, 1.0, 1.0]
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                        ("reward_model", pa.struct([("ground_truth", pa.string())])),
                        ("extra_info", pa.map_(pa.string(), pa.string()))])
    pq.write_table(pa.Table.from_pylist([{**rows[0], "reward_model": {"ground_truth": "A"},
                                          "extra_info": [("split", "train")]}], schema=schema), tmp_path / "map.parquet")
    loaded, skipped = load_rows(str(tmp_path / "map.parquet"))
    assert skipped == [] and loaded[0]["extra_info"] == {"split": "train"}


# ---- bad input: file, row and column named ----

def test_parquet_column_of_the_wrong_type(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": [1, 2], "reward_model": [{"ground_truth": "A"}] * 2}), path)
    with pytest.raises(DataError, match=rf"{path}: column 'prompt' has type int64, expected a list of"):
        load_rows(str(path))
    path = tmp_path / "no_truth.parquet"
    table = pa.table({"prompt": [[{"role": "user", "content": "Q"}]], "reward_model": [{"style": "rule"}]})
    pq.write_table(table, path)
    with pytest.raises(DataError, match=rf"{path}: column 'reward_model' .* expected a struct with 'ground_truth'"):
        open_rows(str(path))


def test_bad_rows_name_file_row_and_column(tmp_path, demo, datasets):
    image = str(datasets["verl + easyr1 jsonl, paths"].parent / "images" / os.path.basename(demo[0]["images"][0]))
    verl, easyr1 = _verl(demo[0], image), _easyr1(demo[0], image)
    bad = [
        ({**verl, "prompt": [{"role": "user", "content": "<image><image>Q"}]},
         "column 'prompt': turn 0: more <image> placeholders than images"),
        ({**verl, "prompt": [{"role": "user", "content": "Q"}]}, "column 'prompt': 1 images but 0 image placeholders"),
        ({**easyr1, "problem": "Q"}, "column 'problem': 1 images but 0 image placeholders"),
        ({**verl, "reward_model": {"style": "rule"}}, "column 'reward_model' must hold the 'ground_truth'"),
        ({k: v for k, v in easyr1.items() if k != "answer"},
         "column 'answer' (the ground truth, EasyR1's schema) is missing"),
        ({**verl, "prompt": "<image>Q"}, "column 'prompt' must be a non-empty list of {role, content} messages"),
        ({**verl, "extra_info": [1]}, "column 'extra_info' must be an object"),
        ({**easyr1, "answer": ["A", "B"]}, "column 'answer' must be a non-empty string or a number"),
        ({**easyr1, "answer": float("nan")}, "column 'answer' must be a non-empty string or a finite number"),
        ({**easyr1, "images": ["nope.png"]}, "images[0]: image"),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in bad) + json.dumps(verl) + "\n")
    rows, skipped = load_rows(str(path))
    assert len(rows) == 1 and len(skipped) == len(bad)
    for line, ((_, what), message) in enumerate(zip(bad, skipped), 1):
        assert message.startswith(f"{path}:{line}: ") and what in message, message
    table = pa.Table.from_pylist([{**verl, "prompt": [{"role": "user", "content": "<image><image>Q"}]}])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad.parquet'}:row 0: column 'prompt': turn 0: more <image>"):
        load_rows(str(tmp_path / "bad.parquet"), bad_rows="fatal")


def test_undecodable_image_bytes_are_named_and_skipped_or_fatal(tmp_path, demo, datasets, processor):
    good = _verl(demo[0], {"bytes": open(datasets["verl + easyr1 jsonl, paths"].parent / "images" /
                                          os.path.basename(demo[0]["images"][0]), "rb").read(), "path": None})
    path = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pylist([{**good, "images": [{"bytes": b"not an image", "path": None}]}, good]), path)
    builder = PromptBuilder(processor, "", 512)
    stream = PromptStream(open_rows(str(path)), builder, shuffle=False)
    assert [p.index for p in stream.take(3)] == [1, 1, 1]
    assert len(stream.skipped) == 1
    assert stream.skipped[0].startswith(
        f"{path}:row 0: image <bytes, 12 bytes> cannot be decoded (column 'images', item 0:")
    with pytest.raises(DataError, match=rf"{path}:row 0: image <bytes, 12 bytes> cannot be decoded"):
        PromptStream(open_rows(str(path)), builder, bad_rows="fatal", shuffle=False).take(1)


def test_folders_that_are_not_one_dataset(tmp_path, datasets):
    dd = tmp_path / "dd"
    dd.mkdir()
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"a Hugging Face DatasetDict \(splits \['train', 'test'\]\); give one split's"):
        open_rows(str(dd))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(datasets["verl parquet, image structs"], mixed)
    shutil.copy(datasets["verl + easyr1 jsonl, paths"], mixed)
    with pytest.raises(DataError, match=r"shards of one kind, found \['.jsonl', '.parquet'\]"):
        open_rows(str(mixed))


# ---- lazy reading ----

def test_bad_rows_are_found_at_start_up_or_when_served(tmp_path, demo, datasets):
    image = str(datasets["verl + easyr1 jsonl, paths"].parent / "images" / os.path.basename(demo[0]["images"][0]))
    path = tmp_path / "rows.jsonl"
    rows = [_easyr1(demo[0], image), {**_easyr1(demo[1], image), "problem": "no placeholder"}, _verl(demo[2], image)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    checked, skipped, _ = open_train(DataConfig(train=str(path)))  # 3 rows <= data.check_rows: checked whole
    assert len(checked) == 2 and len(skipped) == 1 and skipped[0].startswith(f"{path}:2: column 'problem'")
    lazy, skipped, _ = open_train(DataConfig(train=str(path), check_rows=2))
    assert len(lazy) == 3 and skipped == []
    stream = PromptStream(lazy, Stub(), shuffle=False)
    assert [p.index for p in stream.take(5)] == [0, 2, 0, 2, 0]  # the bad row is found once, then passed over
    assert len(stream.skipped) == 1 and stream.skipped[0].startswith(f"{path}:2: column 'problem'")
    assert stream.passed_over == [(f"{path}:2", 0), (f"{path}:2", 1)]
    with pytest.raises(DataError, match=rf"{path}:2: column 'problem': 1 images but 0 image placeholders"):
        PromptStream(lazy, Stub(), bad_rows="fatal", shuffle=False).take(2)


def test_large_datasets_are_served_lazily_and_resume_exactly(tmp_path, datasets):
    path = datasets["verl parquet, image structs"]
    rows, skipped, crowded = open_train(DataConfig(train=str(path), check_rows=N - 1))  # larger than check_rows
    assert len(rows) == N and skipped == [] and crowded == []
    stream = PromptStream(rows, Stub(), seed=5)
    first = [p.index for p in stream.take(N + 2)]
    assert sorted(first[:N]) == list(range(N)) and stream.epoch == 1
    state = stream.state_dict()
    assert "order" not in state and state["num_rows"] == N
    expected = [p.index for p in stream.take(2 * N)]
    resumed = PromptStream(open_rows(str(path)), Stub(), seed=5)
    resumed.load_state_dict(state)
    assert [p.index for p in resumed.take(2 * N)] == expected
    # the same order as a list of the same rows in memory (the order small datasets always had)
    in_memory = PromptStream(load_rows(str(path))[0], Stub(), seed=5)
    assert [p.uid for p in in_memory.take(N + 2)] == [f"{path}:row {i}" for i in first]


MEASURE = """
import json, sys
import pyarrow.parquet  # imported before the measurement: not a cost of reading
from engine.data import PromptStream, load_rows, open_rows
from tests.test_data_formats import Stub

def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

mode, path = sys.argv[1:]
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak below is this read's
before = kib("VmRSS")
if mode == "whole":
    rows = len(load_rows(path)[0])
else:
    rows = len({p.index for p in PromptStream(open_rows(path), Stub(), seed=1).take(64)})
print(json.dumps({"rows": rows, "mb": (kib("VmHWM") - before) / 1024}))
"""


def _peak_growth(mode: str, path) -> dict:
    """Peak memory growth of reading `path` whole, or of serving 64 rows from it, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM reset")
def test_lazy_reading_keeps_memory_bounded(tmp_path, demo, demo_data):
    n, sample = 200_000, 10_000
    rows = [{**r, "images": [f"{demo_data}/{r['images'][0]}"]} for r in demo]
    with open(tmp_path / "big.jsonl", "w") as f:
        f.writelines(json.dumps({**rows[i % N], "id": f"r{i}", "note": "x" * 200}) + "\n" for i in range(n))
    with open(tmp_path / "big.jsonl") as src, open(tmp_path / "small.jsonl", "w") as dst:
        dst.writelines(line for _, line in zip(range(sample), src))
    for name, count in (("big", n), ("small", sample)):
        chunks = (pa.Table.from_pylist([_verl(rows[i % N], {"bytes": None, "path": rows[i % N]["images"][0]})
                                        for i in range(start, min(count, start + sample))])
                  for start in range(0, count, sample))
        first = next(chunks)
        with pq.ParquetWriter(tmp_path / f"{name}.parquet", first.schema) as writer:
            for chunk in [first, *chunks]:
                writer.write_table(chunk, row_group_size=1000)
    for kind in ("jsonl", "parquet"):
        whole = _peak_growth("whole", tmp_path / f"small.{kind}")
        lazy = _peak_growth("lazy", tmp_path / f"big.{kind}")
        assert whole["rows"] == sample and lazy["rows"] == 64
        materialised = whole["mb"] * n / sample  # what holding all n rows would take
        assert materialised > 100, (kind, whole)
        assert lazy["mb"] < materialised / 10, \
            f"{kind}: serving grew {lazy['mb']:.0f} MB, all rows take ~{materialised:.0f} MB"


def test_carried_groups_are_restored_by_row_position(datasets):
    """A checkpoint names a carried-over group's row by position: the resumed run finds it without an
    id index, and refuses a dataset whose row there changed."""
    from engine.sampler import GroupSampler, ScoredGroup
    from rollout.records import GroupResult, Sample

    stream = PromptStream(open_rows(str(datasets["verl parquet, image structs"])), Stub(), seed=2)
    prompt = stream.take(3)[2]
    sampler = GroupSampler(None, None, stream, None, None)
    result = GroupResult(uid=f"{prompt.uid}#3", worker=0, samples=[Sample([5, 6], [-0.5, -0.25], "stop")])
    sampler.carry = [ScoredGroup(prompt, result, ["x"], [1.0], {}, step=1)]
    state = sampler.state_dict()
    resumed = GroupSampler(None, None, PromptStream(open_rows(str(datasets["verl parquet, image structs"])), Stub(),
                                                    seed=2), None, None)
    resumed.load_state_dict(state)
    (group,) = resumed.carry
    assert (group.prompt.uid, group.prompt.index, group.prompt.epoch) == (prompt.uid, prompt.index, prompt.epoch)
    other = GroupSampler(None, None, PromptStream(open_rows(str(datasets["easyr1 parquet, paths"])), Stub()),
                         None, None)
    with pytest.raises(ValueError, match="the training data changed"):
        other.load_state_dict(state)
