"""Hostile and damaged input files for the bad-input corpus (tests/data/bad/cases.yaml).

:func:`hostile_files` writes them under a directory and returns the corpus placeholders naming them:
JSON built to break a parser, outputs files that cannot be paired, copies of a tiny model with one
damaged file each, damaged adapter directories, named pipes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

DEEP = 100_000


def _record(instruction: str, output: str = "an answer") -> dict[str, str]:
    return {"instruction": instruction, "output": output, "generator": "g", "dataset": "d"}


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _data_files(root: Path) -> dict[str, Path]:
    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    lines = {
        "deep.jsonl": "[" * DEEP + "]" * DEEP,
        "nan_literal.jsonl": f'{good}\n{{"instruction": "x", "output": NaN}}',
        "infinity.jsonl": '{"instruction": "x", "output": -Infinity}',
        "huge_float.jsonl": '{"instruction": "x", "output": 1e999}',
        "bignum.jsonl": '{"instruction": "x", "output": ' + "9" * 5000 + "}",
        "dup_key.jsonl": '{"instruction": "x", "output": "a", "output": "b"}',
        "bom_mid.jsonl": f"{good}\n\ufeff{good}",
    }
    paths = {}
    for name, text in lines.items():
        paths[name.split(".")[0]] = root / name
        (root / name).write_text(text + "\n", encoding="utf-8")
    paths["deep_array"] = root / "deep_array.json"
    paths["deep_array"].write_text("[" + "[" * DEEP + "]" * DEEP + "]\n")
    paths["deep_yaml"] = root / "deep.yaml"
    paths["deep_yaml"].write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    return paths


def _outputs_files(root: Path) -> dict[str, Path]:
    pair = [_record("Say hi"), _record("Count to three")]
    texts = {
        "outs": json.dumps(pair),
        "outs_other": json.dumps([_record("Say bye"), _record("Count to four")]),
        "outs_dup": json.dumps([_record("Say hi"), _record("Count to three"), _record("Say hi")]),
        "outs_shuffled": json.dumps(pair[::-1]),
        "outs_nods": json.dumps([{k: v for k, v in r.items() if k != "dataset"} for r in pair]),
        "outs_empty": "[]",
        "outs_blank": "",
        "outs_deep": "[" * DEEP + "]" * DEEP,
        "outs_nan": json.dumps(pair)[:-1] + ', {"instruction": "x", "output": NaN}]',
        "outs_dup_key": '[{"instruction": "x", "output": "a", "output": "b", "generator": "g"}]',
        "outs_bignum": '[{"instruction": "x", "output": ' + "1" * 5000 + "}]",
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = root / f"{name}.json"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def _model_files(root: Path, tiny: Path) -> dict[str, Path]:
    def damaged(name: str, file: str, text: str | None = None, keep: float = 0.5) -> Path:
        copy = Path(shutil.copytree(tiny, root / name))
        if text is None:
            _cut(copy / file, keep)
        else:
            (copy / file).write_text(text)
        return copy

    paths = {
        "st_trunc": damaged("st_trunc", "model.safetensors"),
        "st_garbage": damaged("st_garbage", "model.safetensors", "not safetensors at all"),
        "cfg_trunc": damaged("cfg_trunc", "config.json"),
        "cfg_list": damaged("cfg_list", "config.json", "[1, 2]"),
        "tok_trunc": damaged("tok_trunc", "tokenizer.json", keep=0.3),
        "tok_list": damaged("tok_list", "tokenizer.json", "[]"),
        "tokcfg_str": damaged("tokcfg_str", "tokenizer_config.json", '"x"'),
    }
    for name, cut_config in (("adapter_cfg_trunc", True), ("adapter_st_trunc", False)):
        adapter = root / name
        adapter.mkdir()
        config = {"peft_type": "LORA", "base_model_name_or_path": str(tiny), "r": 2, "target_modules": ["q_proj"]}
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        save_file({"w": torch.zeros(64)}, str(adapter / "adapter_model.safetensors"))
        _cut(adapter / ("adapter_config.json" if cut_config else "adapter_model.safetensors"), 0.6)
        paths[name] = adapter
    paths["gguf_short"] = root / "short.gguf"
    paths["gguf_short"].write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    paths["gguf_garbage"] = root / "garbage.gguf"
    paths["gguf_garbage"].write_bytes(b"GGUF" + b"\xff" * 60)
    return paths


def hostile_files(root: Path, tiny: Path) -> dict[str, str]:
    """Write every hostile file under ``root``; return ``{placeholder: path}``."""
    root.mkdir(parents=True)
    paths = {**_data_files(root), **_outputs_files(root), **_model_files(root, Path(tiny))}
    for name in ("fifo", "fifo_gguf"):
        paths[name] = root / ("pipe.jsonl" if name == "fifo" else "pipe.gguf")
        os.mkfifo(paths[name])
    return {name: str(path) for name, path in paths.items()}
