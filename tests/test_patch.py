"""neftune.patch_transformers: transformers' neftune_noise_alpha made per-example, in process and via `neftune run`.

The TRL tests train a tiny model with `SFTTrainer(neftune_noise_alpha=5)`, padded and padding-free
packed, and observe the noise that reaches the first decoder layer: under the patch each example
gets alpha/sqrt(L_i*d) and the noise is the very noise `NEFTuneCallback` draws; without it every
token of a row gets alpha/sqrt(T*d), T the row length.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.helpers import record_noise
from transformers import TrainerCallback

import neftune
from neftune import patch
from neftune.errors import NeftuneError

ALPHA = 5.0
D = 64
PAD = 259
LENGTHS = [5, 12, 40, 7, 30, 9, 22, 3]
REPO = Path(__file__).resolve().parents[1]
ACTIVE = "per-example NEFTune active"


@pytest.fixture(autouse=True)
def _unpatched():
    patch.unpatch_transformers()
    yield
    patch.unpatch_transformers()


def _examples(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 250, (n,), generator=g).tolist()} for n in lengths]


@contextlib.contextmanager
def _observe(model) -> Iterator[list[dict]]:
    """record_noise plus the position_ids of each call (they mark packed examples)."""
    positions: list = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: positions.append(kw.get("position_ids")) if m.training else None, with_kwargs=True
    )
    try:
        with record_noise(model) as records:
            yield records
    finally:
        hook.remove()
    for record, pos in zip(records, positions, strict=True):
        record["position_ids"] = pos


def _segments(record) -> list[tuple[int, int, int, int]]:
    """(row, start, length L, row length T) of every example in a recorded batch."""
    ids, pos = record["input_ids"], record["position_ids"]
    out = []
    for row in range(ids.shape[0]):
        real = int((ids[row] != PAD).sum())  # right padding (padded batches); packed rows have none
        starts = [0] if pos is None else [int(i) for i in torch.nonzero(pos[row, :real] == 0).flatten()]
        for start, end in zip(starts, [*starts[1:], real], strict=True):
            out.append((row, start, end - start, ids.shape[1]))
    return out


def _ratios(records, per_example: bool) -> list[tuple[int, int, float]]:
    """(L, T, max|noise| * sqrt(scale*d) / alpha) per example; scale is L (per example) or T (the row)."""
    out = []
    for r in records:
        for row, start, n, t in _segments(r):
            peak = r["noise"][row, start : start + n].abs().max().item()
            out.append((n, t, peak * math.sqrt((n if per_example else t) * D) / ALPHA))
    return out


def _sft(model, tokenizer, tmp_path, packing: bool, builtin_alpha: float | None, callbacks=()):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        packing=packing,
        max_length=64,
        per_device_train_batch_size=2,
        max_steps=3,
        neftune_noise_alpha=builtin_alpha,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=0,
        dataset_num_proc=None,
        gradient_checkpointing=False,  # a recomputed forward would be recorded twice
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(_examples()),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    with _observe(model) as records:
        trainer.train()
    assert not [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "NEFTuneStepCallback"]
    return records


def _neftune_hooks(model) -> list:
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return [h for h in hooks if isinstance(getattr(h, "__self__", None), neftune.NEFTuneHandle)]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_under_the_patch_draws_neftunes_per_example_noise(tiny_model, tiny_tokenizer, tmp_path, packing):
    patched_model, callback_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    neftune.patch_transformers(quiet=True)
    patched = _sft(patched_model, tiny_tokenizer, tmp_path, packing, builtin_alpha=ALPHA)
    neftune.unpatch_transformers()
    reference = _sft(callback_model, tiny_tokenizer, tmp_path, packing, None, [neftune.NEFTuneCallback(alpha=ALPHA)])

    assert len(patched) == len(reference) == 3
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(patched, reference, strict=True))
    ratios = _ratios(patched, per_example=True)
    assert len(ratios) >= 6 and all(0.9 < r <= 1 + 1e-5 for _, _, r in ratios)
    if packing:
        assert all(r["noise"].shape[0] == 1 for r in patched)  # padding-free: one row per step
        assert any(n < t / 2 for n, t, _ in ratios)  # rows hold several examples
    else:
        for r in patched:  # padding gets no noise
            assert torch.count_nonzero(r["noise"][r["input_ids"] == PAD]) == 0
    assert not any(hasattr(m, "neftune_noise_alpha") for m in patched_model.modules())
    assert _neftune_hooks(patched_model) == []


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_without_the_patch_scales_by_the_row_length(tiny_model, tiny_tokenizer, tmp_path, packing):
    records = _sft(tiny_model, tiny_tokenizer, tmp_path, packing, builtin_alpha=ALPHA)
    ratios = _ratios(records, per_example=False)
    assert all(0.9 < r <= 1 + 1e-5 for _, _, r in ratios)
    assert any(n < t / 2 for n, t, _ in ratios)  # so these examples got less than sqrt(1/2) of the paper's noise
    if not packing:
        assert any(torch.count_nonzero(r["noise"][r["input_ids"] == PAD]) > 0 for r in records)


def _hook_names():
    import transformers.trainer as trainer_module

    owners = [trainer_module, trainer_module.Trainer]
    with contextlib.suppress(ImportError):  # not in transformers 5.0
        import transformers.integrations.neftune as integration

        owners.append(integration)
    return {
        (owner, name): vars(owner).get(name)
        for owner in owners
        for name in ("activate_neftune", "deactivate_neftune", "_activate_neftune", "_deactivate_neftune")
    }


def test_patch_is_idempotent_announces_once_and_unpatch_restores_the_originals(capfd, monkeypatch):
    monkeypatch.setattr(patch, "_ANNOUNCED", False)
    before = _hook_names()
    neftune.patch_transformers()
    first = _hook_names()
    neftune.patch_transformers()
    assert _hook_names() == first
    changed = [key for key in before if first[key] is not before[key]]
    assert len(changed) >= 2 and all(first[key].__module__ == "neftune.patch" for key in changed)
    assert patch.is_patched()
    err = capfd.readouterr().err
    assert err.count(ACTIVE) == 1 and len(err.strip().splitlines()) == 1
    neftune.unpatch_transformers()
    neftune.unpatch_transformers()
    assert all(_hook_names()[key] is before[key] for key in before)
    assert not patch.is_patched()


def test_missing_hook_point_is_a_one_line_error(monkeypatch):
    import transformers
    import transformers.trainer as trainer_module

    monkeypatch.delattr(trainer_module.Trainer, "_activate_neftune", raising=False)
    monkeypatch.delattr(trainer_module, "activate_neftune", raising=False)
    with pytest.raises(NeftuneError) as error:
        neftune.patch_transformers(quiet=True)
    message = str(error.value)
    assert "\n" not in message
    assert f"transformers {transformers.__version__} has no NEFTune hook point" in message
    assert f"supports transformers{patch.SUPPORTED}" in message
    assert not patch.is_patched()


def test_patched_trainer_refuses_a_second_neftune_callback(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    from neftune.data import PaddingCollator

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, neftune_noise_alpha=ALPHA, report_to=[], use_cpu=True, save_strategy="no"
    )
    neftune.patch_transformers(quiet=True)
    trainer = Trainer(
        model=tiny_model,
        args=args,
        train_dataset=_examples(),
        data_collator=PaddingCollator(PAD),
        callbacks=[neftune.NEFTuneCallback(alpha=ALPHA)],
    )
    with pytest.raises(ValueError, match="already attached"):
        trainer.train()


class _Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom")


def test_train_again_after_an_exception_replaces_the_stale_hooks(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    from neftune.data import PaddingCollator

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, neftune_noise_alpha=ALPHA, report_to=[], use_cpu=True, save_strategy="no"
    )
    neftune.patch_transformers(quiet=True)
    boom = _Boom()
    trainer = Trainer(
        model=tiny_model, args=args, train_dataset=_examples(), data_collator=PaddingCollator(PAD), callbacks=[boom]
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert len(_neftune_hooks(tiny_model)) == 3  # left on, as transformers leaves its own hook
    trainer.remove_callback(boom)
    with _observe(tiny_model) as records:
        trainer.train()  # transformers' own hook would now be stacked twice
    assert _neftune_hooks(tiny_model) == []
    assert all(0.9 < r <= 1 + 1e-5 for _, _, r in _ratios(records, per_example=True))


def test_integration_function_called_directly_is_patched_too(tiny_model):
    integration = pytest.importorskip("transformers.integrations.neftune")
    if not hasattr(integration, "activate_neftune"):
        pytest.skip("this transformers has no module-level activate_neftune")
    ids = torch.randint(0, 250, (3, 60))
    mask = torch.zeros(3, 60, dtype=torch.long)
    for i, n in enumerate([10, 60, 30]):
        mask[i, :n] = 1
    neftune.patch_transformers(quiet=True)
    handle = integration.activate_neftune(tiny_model, ALPHA)
    tiny_model.train()
    with record_noise(tiny_model) as records:
        tiny_model(input_ids=ids, attention_mask=mask)
    integration.deactivate_neftune(tiny_model, handle)
    noise = records[0]["noise"]
    for i, n in enumerate([10, 60, 30]):
        assert noise[i, :n].abs().max().item() * math.sqrt(n * D) / ALPHA == pytest.approx(1.0, abs=0.1)
        assert torch.count_nonzero(noise[i, n:]) == 0
    assert _neftune_hooks(tiny_model) == []


# -- neftune run -------------------------------------------------------------------------------


def _neftune_run(command: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "neftune", "run", "--", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _env(tmp_path: Path, customize: str) -> dict[str, str]:
    """The test's environment plus a sitecustomize of its own that `neftune run` must still run."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(customize))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_bootstrap_waits_for_transformers_and_runs_the_sitecustomize_it_shadows(tmp_path):
    marker = tmp_path / "marker"
    env = patch.patched_environment(_env(tmp_path, f"open({str(marker)!r}, 'w').write('ran')\n"))
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(patch.BOOT_DIR), str(tmp_path / "site")]
    assert patch.patched_environment(env)["PYTHONPATH"] == env["PYTHONPATH"]  # nested `neftune run`
    child = "import sys; print([type(f).__name__ for f in sys.meta_path][0], 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["_PatchAfterImport", "False"]  # nothing heavy imported at startup
    assert out.stderr == ""
    assert marker.read_text() == "ran"


def test_run_forwards_signals_and_the_exit_status(tmp_path):
    env = _env(tmp_path, "")
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(9)); print('ready', flush=True); time.sleep(120)"
    proc = _neftune_run([sys.executable, "-c", child], env)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 9
    proc.communicate()


def test_run_without_a_command_or_with_a_missing_one_is_a_one_line_error(capsys):
    from neftune.cli import main

    assert main(["run", "--", "no-such-command-xyz"]) == 2
    assert capsys.readouterr().err == "neftune: error: neftune run: command not found: no-such-command-xyz\n"
    assert main(["run"]) == 2
    assert "needs a command after --" in capsys.readouterr().err


# The recorder that the `trl sft` child runs (chained from neftune's sitecustomize): when a NEFTune
# handle is created it observes, independently of the noise code, what reaches the model.
RECORDER = """
import json, os
import torch
from neftune.attach import NEFTuneHandle

init = NEFTuneHandle.__init__

def recording_init(self, root, embedding, *args, **kwargs):
    init(self, root, embedding, *args, **kwargs)
    seen = {}
    def capture(module, args, kwargs):
        seen["pos"] = kwargs.get("position_ids")
        seen["mask"] = kwargs.get("attention_mask")
    def observe(module, args, output):
        if not module.training:
            return
        ids = args[0]
        noise = (output - module.weight[ids]).detach()
        pos, mask = seen.get("pos"), seen.get("mask")
        rows = []
        for r in range(ids.shape[0]):
            real = int(mask[r].sum()) if mask is not None else ids.shape[1]
            starts = [0] if pos is None else torch.nonzero(pos[r, :real] == 0).flatten().tolist()
            for s, e in zip(starts, starts[1:] + [real]):
                peak = noise[r, s:e].abs().max().item()
                rows.append({"L": e - s, "T": ids.shape[1], "ratio": peak * ((e - s) * noise.shape[-1]) ** 0.5 / self.alpha})
        with open(os.environ["NEFTUNE_TEST_NOISE_LOG"], "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "examples": rows}) + "\\n")
    root.register_forward_pre_hook(capture, with_kwargs=True)
    embedding.register_forward_hook(observe)

NEFTuneHandle.__init__ = recording_init
"""


@pytest.mark.slow
def test_trl_sft_cli_through_neftune_run_gets_per_example_noise(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    texts = ["short one", "a somewhat longer training text " * 3, "mid length example text", "x" * 50] * 3
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    log = tmp_path / "noise.jsonl"
    env = _env(tmp_path, RECORDER)
    env.update({"NEFTUNE_TEST_NOISE_LOG": str(log), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    env.update({"ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    command = ["trl", "sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data)]
    command += ["--output_dir", str(tmp_path / "out"), "--neftune_noise_alpha", "5", "--packing", "--max_length", "128"]
    command += ["--per_device_train_batch_size", "2", "--max_steps", "2", "--report_to", "none", "--use_cpu"]
    command += ["--save_strategy", "no", "--dtype", "float32", "--disable_tqdm", "true", "--seed", "0"]
    command[0] = str(Path(sys.executable).parent / "trl")
    proc = _neftune_run(command, env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2  # one padding-free packed row per step
    examples = [e for r in records for e in r["examples"]]
    assert len(examples) >= 4 and all(0.9 < e["ratio"] <= 1 + 1e-5 for e in examples)
    assert any(e["L"] < e["T"] / 2 for e in examples)  # the built-in hook would have given these < 0.71x
    for pid in {r["pid"] for r in records}:  # the process that trained said once that the patch was active
        assert err.count(f"{ACTIVE} (pid {pid})") == 1
