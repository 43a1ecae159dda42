"""Records: loading from every supported source, validation messages, tokenisation and loss masks."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdistill.data import Example, collate, load_records, tokenize_records
from opdistill.errors import DataError
from opdistill.models import load_tokenizer


def write_lines(path: Path, rows: list[Any]) -> Path:
    """Write each row as one JSONL line; str rows are written verbatim (for broken lines)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def data_error(spec: str | Path, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_records(str(spec), **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- loading: JSONL forms


def test_prompt_record(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "Hello there"}])
    [record] = load_records(str(path))
    assert record.messages == [{"role": "user", "content": "Hello there"}]
    assert record.response is None
    assert record.meta == {}
    assert record.source == f"{path}:1"


def test_messages_record(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
    ]
    path = write_lines(tmp_path / "d.jsonl", [{"messages": messages}])
    [record] = load_records(str(path))
    assert record.messages == messages
    assert record.response is None


def test_system_field_becomes_first_message(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "Hi", "system": "Answer in French."},
        {"messages": [{"role": "user", "content": "Yo"}], "system": "Answer in German."},
    ])
    first, second = load_records(str(path))
    assert first.messages == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    assert second.messages == [{"role": "system", "content": "Answer in German."}, {"role": "user", "content": "Yo"}]
    # a privileged system prompt goes first, before the record's own; an empty one changes nothing
    assert first.with_system("X") == [{"role": "system", "content": "X\n\nAnswer in French."}, {"role": "user", "content": "Hi"}]
    assert first.with_system("") == first.messages
    bare = load_records(str(write_lines(tmp_path / "b.jsonl", [{"prompt": "Hi"}])))[0]
    assert bare.with_system("X") == [{"role": "system", "content": "X"}, {"role": "user", "content": "Hi"}]


def test_response_field(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "2+2?", "response": "4"}])
    [record] = load_records(str(path), require_response=True)
    assert record.response == "4"
    assert record.messages == [{"role": "user", "content": "2+2?"}]


def test_trailing_assistant_turn_becomes_response(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue"},
    ]}])
    [record] = load_records(str(path), require_response=True)
    assert record.response == "Blue"
    assert record.messages == [{"role": "user", "content": "Name a colour"}]


def test_trailing_assistant_turn_and_response_field_conflict(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "response": "B"}])
    message = data_error(path)
    assert f"{path}:1" in message and "response" in message


def test_extra_fields_land_in_meta(tmp_path: Path) -> None:
    row = {"prompt": "P", "response": "R", "id": 7, "tags": ["a", "b"], "nested": {"k": None}}
    path = write_lines(tmp_path / "d.jsonl", [row])
    [record] = load_records(str(path))
    assert record.meta == {"id": 7, "tags": ["a", "b"], "nested": {"k": None}}


def test_blank_lines_are_skipped_but_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n', encoding="utf-8")
    records = load_records(str(path))
    assert [r.messages[0]["content"] for r in records] == ["a", "b"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]


def test_slicing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    texts = lambda spec: [r.messages[-1]["content"] for r in load_records(spec)]  # noqa: E731
    assert texts(f"{path}[2:5]") == ["p2", "p3", "p4"]
    assert texts(f"{path}[:3]") == ["p0", "p1", "p2"]
    assert texts(f"{path}[8:]") == ["p8", "p9"]
    assert texts(f"{path}[-2:]") == ["p8", "p9"]
    assert len(load_records(str(path))) == 10
    with pytest.raises(DataError, match="no records"):
        load_records(f"{path}[20:30]")


def test_selfinstruct_reference_data(selfinstruct: Path) -> None:
    records = load_records(str(selfinstruct), require_response=True)
    assert len(records) == 252
    for record in records:
        assert record.messages[-1]["role"] == "user" and record.messages[-1]["content"].strip()
        assert isinstance(record.response, str) and record.response.strip()
        assert "target" in record.meta
    assert len(load_records(f"{selfinstruct}[10:20]")) == 10


# ---------------------------------------------------------------- loading: Parquet and datasets


ROWS = [
    {"prompt": "first", "response": "one", "id": 1},
    {"prompt": "second", "response": "two", "id": 2},
    {"prompt": "third", "response": "three", "id": 3},
]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    records = load_records(str(path), require_response=True)
    assert [r.messages for r in records] == [[{"role": "user", "content": row["prompt"]}] for row in ROWS]
    assert [r.response for r in records] == ["one", "two", "three"]
    assert [r.meta for r in records] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert [r.response for r in load_records(f"{path}[1:]")] == ["two", "three"]


def test_parquet_with_messages_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    [record] = load_records(str(path))
    assert record.messages == [{"role": "user", "content": "Q"}] and record.response == "A"


def test_parquet_bad_row_names_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "ok"}, {"prompt": "   "}]), path)
    message = data_error(path)
    assert f"{path}:2" in message and "prompt" in message


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    assert str(path) in data_error(path)


def test_datasets_directory(tmp_path: Path) -> None:
    from datasets import Dataset

    path = tmp_path / "ds"
    Dataset.from_list(ROWS).save_to_disk(str(path))
    records = load_records(str(path), require_response=True)
    assert [r.messages[0]["content"] for r in records] == ["first", "second", "third"]
    assert [r.response for r in records] == ["one", "two", "three"]
    assert [r.meta["id"] for r in records] == [1, 2, 3]
    assert len(load_records(f"{path}[0:2]")) == 2


def test_plain_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "some_dir").mkdir()
    assert "some_dir" in data_error(tmp_path / "some_dir")


# ---------------------------------------------------------------- built-in prompt sets


def test_builtin_sets() -> None:
    train = load_records("builtin:train")
    heldout = load_records("builtin:heldout")
    assert len(train) + len(heldout) >= 300
    assert len(heldout) >= 50
    train_ids = {r.meta["id"] for r in train}
    heldout_ids = {r.meta["id"] for r in heldout}
    assert len(train_ids) == len(train) and len(heldout_ids) == len(heldout)
    assert not train_ids & heldout_ids
    every_fifth = lambda ident: int(ident.lstrip("p")) % 5 == 0  # noqa: E731
    assert all(every_fifth(i) for i in heldout_ids)
    assert not any(every_fifth(i) for i in train_ids)
    # no prompt text appears in both splits
    assert not {r.messages[-1]["content"] for r in train} & {r.messages[-1]["content"] for r in heldout}
    for record in train + heldout:
        assert record.response is None
        assert record.messages[-1]["role"] == "user" and record.messages[-1]["content"].strip()
    assert len(load_records("builtin:all")) == len(train) + len(heldout)
    assert [r.meta["id"] for r in load_records("builtin:train[0:5]")] == [r.meta["id"] for r in train[:5]]


def test_unknown_builtin_set() -> None:
    assert "builtin:test" in data_error("builtin:test")


# ---------------------------------------------------------------- bad input


BAD_LINES = [
    # (line as written, words that must appear in the message besides file:line)
    ('{"prompt": "unterminated', ["JSON"]),
    ("[1, 2, 3]", ["object"]),
    ('"just a string"', ["object"]),
    ('{"prompt": 5}', ["prompt"]),
    ('{"messages": {"role": "user", "content": "x"}}', ["messages"]),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', ["messages[0]", "content"]),
    ('{"prompt": "x", "system": 3}', ["system"]),
    ('{"prompt": "x", "response": 42}', ["response"]),
    ('{"messages": []}', ["messages", "empty"]),
    ('{"messages": [{"role": "robot", "content": "x"}]}', ["messages[0]", "role", "robot"]),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]}',
     ["messages[1]", "system"]),
    ('{"prompt": ""}', ["prompt", "empty"]),
    ('{"prompt": "   \\n "}', ["prompt", "empty"]),
    ('{"response": "orphan"}', ["messages", "prompt"]),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     ["messages", "user"]),
    ('{"messages": [{"role": "system", "content": "s"}]}', ["messages", "user"]),
    ('{"prompt": "x", "response": ""}', ["response", "empty"]),
]


@pytest.mark.parametrize("line, words", BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_bad_line_names_file_line_and_field(tmp_path: Path, line: str, words: list[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + '\n{"prompt": "also fine"}\n', encoding="utf-8")
    message = data_error(path)
    assert f"{path}:2" in message, message
    assert f"{path}:1" not in message and f"{path}:3" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_missing_response_when_required(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "no answer"}])
    assert len(load_records(str(path))) == 2  # fine when not required
    message = data_error(path, require_response=True)
    assert f"{path}:2" in message and "response" in message and f"{path}:1" not in message


def test_several_bad_lines_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": 1}\n'
        '{"prompt": "good"}\n'
        'not json\n'
        '{"messages": [{"role": "bot", "content": "x"}]}\n'
        '{"prompt": "x", "system": []}\n',
        encoding="utf-8",
    )
    message = data_error(path)
    assert "4 bad record(s)" in message
    for number, field in [(1, "prompt"), (3, "JSON"), (4, "role"), (5, "system")]:
        assert f"{path}:{number}" in message
        line = next(part for part in message.splitlines() if f"{path}:{number}:" in part)
        assert field in line, line
    assert f"{path}:2:" not in message


def test_many_bad_lines_are_capped(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": i} for i in range(50)])
    message = data_error(path)
    assert "50 bad record(s)" in message
    assert "and 30 more" in message
    assert len(message) < 10_000


def test_binary_garbage(tmp_path: Path) -> None:
    rng = random.Random(0)
    for attempt in range(20):
        path = tmp_path / f"garbage{attempt}.jsonl"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
        message = data_error(path)
        assert str(path) in message


def test_binary_line_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n\xff\xfe\x00\x81garbage\n')
    message = data_error(path)
    assert f"{path}:2" in message and "UTF-8" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert str(path) in data_error(path)
    path.write_text("\n\n  \n")
    assert str(path) in data_error(path)


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    message = data_error(missing)
    assert str(missing) in message and "does not exist" in message
    assert str(missing) in data_error(f"{missing}[0:3]")


def test_deeply_nested_json_is_a_data_error(tmp_path: Path) -> None:
    # json.loads raises RecursionError on deep nesting; a data file must still give a DataError.
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    assert f"{path}:2" in data_error(path)


def test_huge_integer_is_a_data_error(tmp_path: Path) -> None:
    # json.loads raises ValueError (not JSONDecodeError) on integers over Python's 4300-digit limit.
    path = tmp_path / "big.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "x", "id": ' + "9" * 5000 + "}\n", encoding="utf-8")
    assert f"{path}:2" in data_error(path)


# ---------------------------------------------------------------- property: never another exception

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
KEYS = ["prompt", "messages", "system", "response", "role", "content"]
good_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=10)})
odd_message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]) | json_values,
                  "content": st.text(max_size=10) | json_values},
)
field_value = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="ab \n", min_size=1, max_size=4),
    st.lists(good_message, max_size=4),
    st.lists(good_message | odd_message | json_values, max_size=4),
    st.none(),
    json_values,
)
record_like = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries({}, optional={key: field_value for key in KEYS}),
    st.dictionaries(st.text(max_size=6), json_values, max_size=2),
)
short_text = st.text(max_size=10) | st.text(alphabet="ab \n", max_size=3)
optional_text = {"system": short_text | json_values, "response": short_text | json_values}
plausible_prompt = st.fixed_dictionaries({"prompt": short_text}, optional={**optional_text, "messages": st.none()})
plausible_chat = st.fixed_dictionaries({"messages": st.lists(good_message, min_size=1, max_size=4)}, optional=optional_text)
rows = st.one_of(json_values, record_like, plausible_prompt, plausible_chat)

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(row=rows, require_response=st.booleans())
def test_load_records_only_raises_data_error(tmp_path: Path, row: Any, require_response: bool) -> None:
    path = tmp_path / "prop.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    try:
        records = load_records(str(path), require_response=require_response)
    except DataError as err:
        assert str(path) in str(err)
        return
    assert len(records) == 1
    for record in records:
        assert record.messages and record.messages[-1]["role"] == "user"
        assert record.messages[-1]["content"].strip()
        assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str) for m in record.messages)
        assert all(m["role"] != "system" for m in record.messages[1:])
        assert record.response is None or (isinstance(record.response, str) and record.response.strip())
        if require_response:
            assert record.response is not None
        assert not {"prompt", "messages", "system", "response"} & set(record.meta)


# ---------------------------------------------------------------- tokenisation and masks


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(str(tiny_model))


def make_records(tmp_path: Path, rows: list[dict[str, Any]]) -> list[Any]:
    return load_records(str(write_lines(tmp_path / "t.jsonl", rows)), require_response=True)


def test_loss_mask_covers_exactly_the_response(tmp_path: Path, tokenizer: Any) -> None:
    records = make_records(tmp_path, [
        {"prompt": "How do I boil an egg?", "response": "Put it in boiling water for nine minutes."},
        {"prompt": "Hi", "response": "Hello"},
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Tell me a long story please"},
                      {"role": "assistant", "content": "Once"}]},
    ])
    examples, report = tokenize_records(tokenizer, records, max_prompt_tokens=512, max_response_tokens=512, overlong="truncate")
    assert len(examples) == 3 and report.total == 3 and report.truncated == 0 and report.skipped == 0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    for record, example in zip(records, examples):
        expected_prompt = tokenizer(
            tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        assert example.prompt_ids == expected_prompt
        assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")
        assert example.response_ids[-1] == eos
        assert example.response_ids[:-1] == tokenizer(record.response, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(example.response_ids[:-1]) == record.response

    batch = collate(examples, pad)
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["loss_mask"].shape == batch["input_ids"].shape == batch["attention_mask"].shape
    for row, example in enumerate(examples):
        p, r = len(example.prompt_ids), len(example.response_ids)
        ids = batch["input_ids"][row].tolist()
        mask = batch["loss_mask"][row].tolist()
        attention = batch["attention_mask"][row].tolist()
        assert ids[: p + r] == example.prompt_ids + example.response_ids
        assert mask == [0] * p + [1] * r + [0] * (len(ids) - p - r)
        assert attention == [1] * (p + r) + [0] * (len(ids) - p - r)
        assert all(i == pad for i in ids[p + r:])
        assert sum(mask) == r
    # at least one row is padded, so the padding case is exercised
    assert min(lengths) < max(lengths)


def test_overlong_prompt_truncate_keeps_the_end(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    records = make_records(tmp_path, [{"prompt": long_prompt, "response": "ok"}, {"prompt": "short", "response": "fine"}])
    full = tokenizer(tokenizer.apply_chat_template(records[0].messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    short = tokenizer(tokenizer.apply_chat_template(records[1].messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    limit = 32
    assert len(full) > limit >= len(short)
    examples, report = tokenize_records(tokenizer, records, max_prompt_tokens=limit, max_response_tokens=64, overlong="truncate")
    assert len(examples) == 2
    assert report.total == 2 and report.truncated == 1 and report.skipped == 0
    assert examples[0].prompt_ids == full[-limit:]
    assert len(examples[0].prompt_ids) == limit
    assert tokenizer.decode(examples[0].prompt_ids).endswith("<|im_start|>assistant\n")
    assert examples[1].prompt_ids == short
    assert "1 over-long prompts truncated" in report.summary()


def test_overlong_prompt_skip_drops_and_counts(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    records = make_records(tmp_path, [
        {"prompt": long_prompt, "response": "a"},
        {"prompt": "short", "response": "b"},
        {"prompt": long_prompt + " again", "response": "c"},
    ])
    examples, report = tokenize_records(tokenizer, records, max_prompt_tokens=32, max_response_tokens=64, overlong="skip")
    assert len(examples) == 1
    assert report.total == 3 and report.skipped == 2 and report.truncated == 0
    assert tokenizer.decode(examples[0].response_ids[:-1]) == "b"
    # every record skipped: a DataError, not an empty training set
    with pytest.raises(DataError, match="skipped"):
        tokenize_records(tokenizer, [records[0]], max_prompt_tokens=32, max_response_tokens=64, overlong="skip")


def test_long_response_is_cut_without_eos(tmp_path: Path, tokenizer: Any) -> None:
    response = " ".join(f"token{i}" for i in range(100))
    records = make_records(tmp_path, [{"prompt": "Count", "response": response}])
    full = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(full) > 10
    [example], _ = tokenize_records(tokenizer, records, max_prompt_tokens=64, max_response_tokens=10, overlong="truncate")
    assert example.response_ids == full[:10]
    assert tokenizer.eos_token_id not in example.response_ids
    # a response that fits exactly (with its EOS) keeps the EOS
    [fits], _ = tokenize_records(tokenizer, records, max_prompt_tokens=64, max_response_tokens=len(full) + 1, overlong="truncate")
    assert fits.response_ids == full + [tokenizer.eos_token_id]


def test_tokenize_without_response_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "no response"}])
    records = load_records(str(path))
    with pytest.raises(DataError, match=f"{path}:1"):
        tokenize_records(tokenizer, records, max_prompt_tokens=64, max_response_tokens=64, overlong="truncate")


def test_collate_with_empty_prompt_and_single_row() -> None:
    batch = collate([Example([5, 6], [7, 8, 9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]

