"""``neftune train --method dpo`` under ``accelerate launch`` (configs/accelerate/ddp.yaml): 2 CPU processes.

The tiny random model trains 2 DPO steps with LoRA, 2 pairs per rank.  A driver records, in each
rank, every forward of the input embedding: whether TRL ran it as the reference (inside its own
``use_adapter`` context) and the noise neftune added to each row.  The reference forwards must get
none, every chosen and rejected row its own alpha/sqrt(L*d), and the two ranks different streams.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
ALPHA = 10.0

DRIVER = textwrap.dedent(
    '''
    """`neftune train` recording, per embedding forward: reference or policy, and each row's noise."""
    import contextlib, importlib, json, math, os, sys
    import trl.trainer.dpo_trainer as dpo_module

    from neftune.cli import main

    attach_module = importlib.import_module("neftune.attach")
    real = attach_module.NEFTuneHandle._add_noise
    in_reference = [False]
    original = dpo_module.use_adapter

    @contextlib.contextmanager
    def marked(*args, **kwargs):
        in_reference[0] = True
        try:
            with original(*args, **kwargs):
                yield
        finally:
            in_reference[0] = False

    dpo_module.use_adapter = marked
    calls = []

    def recording(self, module, args, output):
        noisy = real(self, module, args, output)
        call = {"reference": in_reference[0], "noised": noisy is not None, "step": self.step, "rows": []}
        if noisy is not None:
            call["seed"] = self._generators[output.device].initial_seed()
            mask = self._context["attention_mask"]
            delta = (noisy - output).detach().float()
            for row in range(delta.shape[0]):
                n = int(mask[row].sum())
                peak = delta[row, :n].abs().max().item()
                call["rows"].append({"length": n, "ratio": peak * math.sqrt(n * delta.shape[-1]) / self.alpha,
                                     "padding_noise": delta[row, n:].abs().sum().item()})
        calls.append(call)
        return noisy

    attach_module.NEFTuneHandle._add_noise = recording
    code = main(sys.argv[1:])
    with open(os.path.join(os.environ["DRAWS_DIR"], f"rank{os.environ['RANK']}.json"), "w") as fh:
        json.dump(calls, fh)
    sys.exit(code)
    '''
)


@pytest.fixture(scope="module")
def cache(neftune_cache):
    """The session's neftune cache (tests/conftest.py), tiny-random built."""
    return neftune_cache


@pytest.mark.slow
def test_dpo_under_ddp_noises_each_ranks_policy_per_example_and_never_the_reference(cache, tmp_path):
    pairs = [
        {"prompt": f"Question {i}: " + "why " * i, "chosen": "Yes." * (1 + i % 2), "rejected": "No, never. " * (2 + i)}
        for i in range(8)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml")]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", str(driver)]
    cmd += ["train", "--method", "dpo", "--model", "tiny-random", "--data", str(data), "--output", str(out)]
    cmd += ["--max-steps", "2", "--batch-size", "2", "--alpha", str(ALPHA), "--no-progress", "train.logging_steps=1"]
    env = {**os.environ, **ENV, "NEFTUNE_CACHE": str(cache), "DRAWS_DIR": str(tmp_path)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["method"] == "dpo" and summary["max_steps"] == 2
    assert (out / "model" / "adapter_model.safetensors").is_file()
    seeds = []
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        reference = [c for c in calls if c["reference"]]
        policy = [c for c in calls if not c["reference"]]
        assert len(reference) == len(policy) == 2  # one of each per step
        assert not any(c["noised"] for c in reference)
        assert [c["step"] for c in policy] == [0, 1]
        rows = [r for c in policy for r in c["rows"]]
        assert len(rows) == 2 * 2 * 2  # 2 steps x (2 chosen + 2 rejected rows)
        assert all(0.9 < r["ratio"] <= 1 + 1e-5 and r["padding_noise"] == 0 for r in rows), rows
        assert len({r["length"] for r in rows}) > 2
        seeds.append({c["seed"] for c in policy})
    assert all(len(s) == 2 for s in seeds) and not seeds[0] & seeds[1]
