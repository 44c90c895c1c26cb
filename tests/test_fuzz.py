"""Random bytes and random JSON/YAML structures into every loader: only neftune's own errors escape.

Each property runs a bounded number of examples (a few seconds in all); a loader may accept an
input or refuse it with a :class:`~neftune.errors.NeftuneError`, and nothing else.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neftune.compare_config import CompareConfig
from neftune.config import Config, load_config
from neftune.data.formats import load_eval_examples, load_examples
from neftune.errors import NeftuneError
from neftune.generate import read_outputs
from neftune.model_cache import convert_gguf
from neftune.model_files import check_model_files

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# Records shaped like the formats, so the fuzzing reaches past format detection.
keys = st.sampled_from(
    ["instruction", "input", "output", "conversations", "messages", "from", "value", "role", "content", "generator"]
)
records = st.dictionaries(keys, json_values | st.lists(st.dictionaries(keys, json_values, max_size=3), max_size=3))
documents = json_values | st.lists(records, max_size=4)
# Bytes that look like JSON some of the time: fragments of a valid document, then noise.
json_bytes = st.builds(
    lambda doc, cut, noise: json.dumps(doc, allow_nan=True).encode()[:cut] + noise,
    documents,
    st.integers(0, 400),
    st.binary(max_size=8),
)
any_bytes = st.binary(max_size=300) | json_bytes


def accepted_or_own_error(load, *args, **kwargs) -> None:
    try:
        load(*args, **kwargs)
    except NeftuneError as error:
        assert "\n" not in str(error)


def write(directory: str, name: str, data: bytes) -> Path:
    path = Path(directory) / name
    path.write_bytes(data)
    return path


@FUZZ
@given(data=any_bytes, suffix=st.sampled_from([".json", ".jsonl"]), skip=st.booleans())
def test_data_files(data, suffix, skip):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, "data" + suffix, data)
        accepted_or_own_error(load_examples, str(path), on_bad_record="skip" if skip else "error")


@FUZZ
@given(doc=documents, lines=st.booleans())
def test_data_structures(doc, lines):
    text = "\n".join(json.dumps(r) for r in doc) if lines and isinstance(doc, list) else json.dumps(doc)
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, "data.jsonl" if lines else "data.json", text.encode())
        accepted_or_own_error(load_examples, str(path))
        accepted_or_own_error(load_eval_examples, str(path), require_response=False)


@FUZZ
@given(data=any_bytes | st.lists(records, max_size=3).map(lambda r: json.dumps(r).encode()))
def test_outputs_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        accepted_or_own_error(read_outputs, write(tmp, "outputs.json", data))


yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)
sections = st.dictionaries(
    st.sampled_from(["model", "data", "noise", "train", "compare", "judge", "eval", "lora"]),
    yaml_values | st.dictionaries(st.sampled_from(["name", "alpha", "lr", "alphas", "seeds", "max_steps"]), scalars),
    max_size=3,
)


@FUZZ
@given(
    data=st.binary(max_size=200) | sections.map(lambda s: yaml.safe_dump(s).encode()),
    cls=st.sampled_from([Config, CompareConfig]),
)
def test_config_files(data, cls):
    with tempfile.TemporaryDirectory() as tmp:
        accepted_or_own_error(load_config, cls, write(tmp, "config.yaml", data), [])


@FUZZ
@given(
    name=st.sampled_from(["config.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json"]),
    data=any_bytes,
    weights=st.binary(max_size=200)
    | st.builds(lambda n, rest: n.to_bytes(8, "little") + rest, st.integers(0, 400), json_bytes),
)
def test_model_files(name, data, weights):
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp, name, data)
        write(tmp, "model.safetensors", weights)
        accepted_or_own_error(check_model_files, Path(tmp))


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=15, deadline=None)
@given(data=st.binary(max_size=120))
def test_gguf_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(tmp, "model.gguf", b"GGUF" + data)
        with pytest.raises(NeftuneError):  # no few bytes make a model
            convert_gguf(path, Path(tmp) / "out")
