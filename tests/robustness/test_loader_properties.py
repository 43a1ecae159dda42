"""Property-based tests of the loaders: whatever a line holds, loading gives records or a DataError that names
the file and line; never another exception. Valid records round-trip."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdistill.data import load_records
from opdistill.errors import DataError
from opdistill.evaluate.prompts import load_eval_set

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "bot", "", None])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": json_scalars}), max_size=4)
# Rows that look like records, with every field possibly of the wrong type or missing.
record_like = st.fixed_dictionaries({}, optional={"prompt": json_values, "messages": messages | json_values, "response": json_values,
                                                  "system": json_values, "target": json_values})
mtbench_like = st.fixed_dictionaries({"question_id": st.integers(), "turns": json_values | st.lists(st.text(max_size=20), max_size=3)},
                                     optional={"reference": json_values, "category": json_values})
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_lines(lines: list[bytes], loader=load_records):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            return loader(str(path)), path
        except DataError as err:
            assert str(path) in err.message, err.message  # every error names the file
            return err, path


@SETTINGS
@given(st.lists(record_like | json_values, min_size=1, max_size=5))
def test_any_json_rows_give_records_or_a_data_error(rows):
    result, _ = load_lines([json.dumps(row).encode() for row in rows])
    if not isinstance(result, DataError):
        assert all(record.messages[-1]["role"] == "user" for record in result)


@SETTINGS
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=5))
def test_any_bytes_give_records_or_a_data_error(lines):
    load_lines([line.replace(b"\n", b" ") for line in lines])


@SETTINGS
@given(st.lists(st.tuples(st.text(min_size=1, max_size=40).filter(str.strip), st.text(min_size=1, max_size=40).filter(str.strip)),
                min_size=1, max_size=5))
def test_valid_records_round_trip(pairs):
    result, _ = load_lines([json.dumps({"prompt": p, "response": r}).encode() for p, r in pairs])
    assert not isinstance(result, DataError), result
    assert [(rec.messages[-1]["content"], rec.response) for rec in result] == pairs


@SETTINGS
@given(st.lists(mtbench_like, min_size=1, max_size=4))
def test_mt_bench_like_rows_give_a_prompt_set_or_a_data_error(rows):
    result, _ = load_lines([json.dumps(row).encode() for row in rows], loader=load_eval_set)
    if not isinstance(result, DataError):
        assert len(result.records) == len(rows) and all(r.messages[0]["role"] == "user" for r in result.records)
