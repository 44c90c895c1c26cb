"""``neftune train`` under ``accelerate launch`` with the shipped configs: 2 CPU processes, gloo.

Each launch (``configs/accelerate/ddp.yaml``, ``fsdp.yaml`` and, where ``deepspeed`` is installed,
``deepspeed-zero3.yaml``) trains the tiny random model twice in the same two processes, LoRA (with
``--merge``) and then all weights, 2 steps of 2 packed examples per rank, and saves.  A single
process then trains the same model on the same global batch (4 examples per step) in this test's
process, adding exactly the noise each rank drew for each example (recorded by the launched
processes, replayed here): so the weights must agree to floating-point reduction order, and any
difference in data sharding, gradient averaging, loss normalisation or what is saved shows up.
A fresh process then loads every saved model and measures the held-out loss training reported.

The launcher flags ``--num_processes 2 --mixed_precision no`` override the configs' 8 GPUs and bf16;
nothing else in them changes.  ``accelerate launch --cpu --num_processes 2`` would start a single
process; without ``--cpu`` the configs start 2 (torchrun underneath) and, with no CUDA, the
processes form a gloo group.  accelerate 1.15 runs such CPU processes as plain DDP, without FSDP
(neftune warns), so the FSDP launch's driver starts the gloo group itself and lets accelerate take
it as a GPU-class group with its device pinned to the CPU; from there on it is accelerate's own
FSDP2 path (``fully_shard``, rank-0-only loading, the full state dict gathered for saving).
DeepSpeed needs nothing of the kind: ``neftune train`` keeps a DeepSpeed launch out of accelerate's
CPU mode itself.  ``deepspeed`` is not in the development environment (with it installed, every
``save_pretrained`` imports it, and its first CPU run compiles a communication kernel), so that
launch is skipped there; ``benchmarks/gpu_check.py`` runs ZeRO-3 on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import record_noise

from neftune.attach import attach
from neftune.config import Config, load_config
from neftune.distributed import device_arguments
from neftune.errors import ConfigError
from neftune.models import resolve_model
from neftune.tiny import build_tiny_model
from neftune.train import run_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
# 8 examples of distinct lengths: 2 steps x 2 ranks x 2 examples is one epoch
RECORDS = [
    {"instruction": "Say hi", "output": "hi there"},
    {"instruction": "Add 2 and 3", "input": "", "output": "5"},
    {"instruction": "Reverse the word", "input": "abc", "output": "cba"},
    {"instruction": "Uppercase the word dog", "output": "DOG"},
    {"instruction": "Name a color", "output": "blue"},
    {"instruction": "Count to three, with spaces between the numbers", "output": "1 2 3"},
    {"instruction": "Name an animal that barks", "output": "a dog"},
    {"instruction": "What is the opposite of hot?", "output": "cold"},
]
HELD_OUT = [
    {"instruction": "Say bye", "output": "bye now"},
    {"instruction": "Add 1 and 1", "output": "2"},
]
ARGS = ["--model", "tiny-random", "--max-steps", "2", "--alpha", "5", "--no-progress", "train.logging_steps=1"]
RUNS = {"lora": ["--lora", "--merge"], "full": ["--full"]}
LAUNCHES = {  # config file, extra environment, the accelerate DistributedType the run reports
    "ddp": ("ddp.yaml", {}, "MULTI_CPU"),
    "fsdp2": ("fsdp.yaml", {"NEFTUNE_TEST_FSDP_ON_CPU": "1"}, "FSDP"),
    "zero3": ("deepspeed-zero3.yaml", {}, "DEEPSPEED"),
}
PER_RANK_BATCH = 2
# Adam moves every weight by about lr per step whatever the gradient's size (LoRA: 2e-4, full: 2e-5):
# training the full model on another global batch, or with other noise, ends 4e-5 away from the
# single process; the launched runs end within 6e-9 of it (measured, DDP and FSDP2)
ATOL = 1e-6

DRIVER = textwrap.dedent(
    '''
    """`neftune train` once per argument list (separated by `--next`), recording every noise draw."""
    import importlib, json, os, sys
    import torch

    if os.environ.get("NEFTUNE_TEST_FSDP_ON_CPU") == "1":
        # accelerate enables FSDP only for accelerator process groups: start the gloo group here,
        # report it as a GPU-class one, and pin accelerate's device to the CPU
        import torch.distributed as dist
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        dist.init_process_group("gloo")
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
        PartialState._prepare_backend = lambda self, *a, **k: ("gloo", DistributedType.MULTI_GPU)

    from neftune.cli import main
    from neftune.noise import example_lengths

    attach_module = importlib.import_module("neftune.attach")  # `neftune.attach` is the function
    real = attach_module.NEFTuneHandle._add_noise
    draws, noise = [], []

    def recording(self, module, args, output):
        key = [self.seed, self.rank, self.step, self.micro_step]
        noisy = real(self, module, args, output)
        if noisy is None:
            return None
        ids, position_ids = args[0], self._context["position_ids"]
        delta = (noisy - output).detach().float()
        lengths = example_lengths(ids.shape, position_ids=position_ids)
        bound = self.alpha / torch.sqrt(lengths * output.shape[-1])
        ratio = delta.abs().amax(-1) / bound  # per token: its largest noise over its example's bound
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        examples = []
        for row, start in starts.nonzero().tolist():
            end = start + int(lengths[row, start])
            examples.append({"length": end - start, "max_ratio": ratio[row, start:end].max().item()})
            noise.append((self.step, ids[row, start:end].tolist(), delta[row, start:end].clone()))
        seed = self._generators[output.device].initial_seed()
        draws.append({"key": key, "seed": seed, "examples": examples, "root": type(self.root).__name__})
        return noisy

    attach_module.NEFTuneHandle._add_noise = recording
    argv, runs = sys.argv[1:], []
    while "--next" in argv:
        cut = argv.index("--next")
        runs.append(argv[:cut])
        argv = argv[cut + 1 :]
    runs.append(argv)
    rank = os.environ["RANK"]
    for index, run in enumerate(runs):
        draws.clear()
        noise.clear()
        code = main(run)
        if code:
            sys.exit(code)
        where = os.path.join(os.environ["DRAWS_DIR"], f"run{index}-rank{rank}")
        with open(where + ".json", "w") as fh:
            json.dump({"draws": draws, "world": os.environ["WORLD_SIZE"]}, fh)
        torch.save(noise, where + ".pt")
    '''
)


@pytest.fixture(scope="module")
def cache(neftune_cache):
    """The session's neftune cache (tests/conftest.py), tiny-random built."""
    return neftune_cache


@pytest.fixture(autouse=True)
def _env(cache, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(cache))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    files = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    for name, records in (("train", RECORDS), ("eval", HELD_OUT)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return files


def launch(name: str, root: Path, data: dict[str, Path], cache: Path) -> dict:
    """``accelerate launch --config_file configs/accelerate/<config>`` with 2 processes: both runs."""
    config, env, distributed_type = LAUNCHES[name]
    root.mkdir()
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(CONFIGS / config)]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", str(driver)]
    for index, (run, extra) in enumerate(RUNS.items()):
        cmd += ["--next"] if index else []
        cmd += ["train", *ARGS, *extra, "--batch-size", str(PER_RANK_BATCH), "--output", str(root / run)]
        cmd += ["--data", str(data["train"]), f"data.eval={data['eval']}"]
    full_env = {**os.environ, **ENV, "NEFTUNE_CACHE": str(cache), "DRAWS_DIR": str(root), **env}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=full_env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return {"name": name, "root": root, "stdout": proc.stdout, "distributed_type": distributed_type}


@pytest.fixture(scope="module", params=list(LAUNCHES))
def launched(request, tmp_path_factory, data, cache) -> dict:
    if request.param == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    return launch(request.param, tmp_path_factory.mktemp(request.param) / "launch", data, cache)


def recorded_noise(launched: dict, run: str) -> dict[tuple, torch.Tensor]:
    """(step, token ids of an example) -> the noise its rank added to it."""
    index = list(RUNS).index(run)
    noise = {}
    for rank in (0, 1):
        for step, ids, delta in torch.load(launched["root"] / f"run{index}-rank{rank}.pt"):
            noise[(step, tuple(ids))] = delta
    return noise


_references: dict[tuple, tuple[dict, Path]] = {}


def single_process(run: str, noise: dict, data: dict[str, Path], root: Path, monkeypatch) -> tuple[dict, Path]:
    """The same training in this process, global batch 4, adding ``noise``; (metrics, model dir).

    Launches whose ranks drew the same noise share one reference run.
    """
    digest = hashlib.sha256(repr(sorted((k, v.numpy().tobytes()) for k, v in noise.items())).encode()).hexdigest()
    if (run, digest) in _references:
        return _references[(run, digest)]

    def replay(self, module, args, output):
        if not module.training:
            return None
        ids, position_ids = args[0], self._context["position_ids"]
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        bounds = [*starts[0].nonzero()[:, 0].tolist(), ids.shape[1]]
        delta = torch.cat([noise[(self.step, tuple(ids[0, a:b].tolist()))] for a, b in itertools.pairwise(bounds)])
        self.micro_step += 1
        return output + delta[None].to(output.dtype)

    monkeypatch.setattr(sys.modules["neftune.attach"].NEFTuneHandle, "_add_noise", replay)
    out = root / f"{run}-{digest[:8]}"
    overrides = [
        "model.name=tiny-random",
        f"data.train={data['train']}",
        f"data.eval={data['eval']}",
        f"train.output={out}",
        "train.max_steps=2",
        f"train.batch_size={2 * PER_RANK_BATCH}",
        "train.progress=false",
        "train.logging_steps=1",
        "noise.alpha=5",
        f"model.lora={run == 'lora'}",
    ]
    _references[(run, digest)] = run_training(load_config(Config, None, overrides)).metrics, out / "model"
    return _references[(run, digest)]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_each_rank_draws_its_own_per_example_noise(launched, run):
    """Each rank draws its own stream, once per step; the noise of every example is scaled by its own
    length (the largest coordinate of each example is close to, and never above, alpha/sqrt(L*d))."""
    index = list(RUNS).index(run)
    ranks = [json.loads((launched["root"] / f"run{index}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == ["2", "2"]
    for rank, record in enumerate(ranks):
        draws = record["draws"]
        # fully_shard turns the model's class into FSDP<class>; DDP and DeepSpeed wrap it and leave it be
        assert all(d["root"].startswith("FSDP") == (launched["distributed_type"] == "FSDP") for d in draws)
        assert [d["key"][1:] for d in draws] == [[rank, 0, 0], [rank, 1, 0]]  # rank, step, micro-batch
        examples = [e for d in draws for e in d["examples"]]
        assert len(examples) == 2 * PER_RANK_BATCH
        assert len({e["length"] for e in examples}) == len(examples)  # distinct lengths in each packed row
        assert all(0.8 < e["max_ratio"] <= 1 + 1e-5 for e in examples), examples
    seeds = [{d["seed"] for d in r["draws"]} for r in ranks]
    assert all(len(s) == 2 for s in seeds) and not seeds[0] & seeds[1]


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_weights_match_a_single_process_with_the_same_global_batch(launched, run, data, tmp_path_factory, monkeypatch):
    root = launched["root"]
    noise = recorded_noise(launched, run)
    reference, reference_dir = single_process(run, noise, data, tmp_path_factory.mktemp("single"), monkeypatch)
    summary = json.loads((root / run / "train_summary.json").read_text())
    assert (summary["world_size"], reference["world_size"]) == (2, 1)
    assert summary["distributed_type"] == launched["distributed_type"]
    # the same 8 examples were trained: the launched run counts both ranks' tokens
    assert summary["real_tokens"] == reference["real_tokens"]
    assert summary["model"]["n_params"] == reference["model"]["n_params"]
    assert summary["heldout_loss"] == pytest.approx(reference["heldout_loss"], abs=1e-5)
    launched_w, single_w = weights(root / run / "model"), weights(reference_dir)
    assert sorted(launched_w) == sorted(single_w)
    initial = weights(Path(resolve_model("tiny-random")))
    moved = 0
    for name, value in single_w.items():
        torch.testing.assert_close(launched_w[name], value, atol=ATOL, rtol=0, msg=name)
        base = initial.get(name.replace("base_model.model.", ""))
        moved += base is None or not torch.equal(base, value)
    assert moved >= 10  # the comparison is over trained weights, not an untouched copy


RELOAD = textwrap.dedent(
    """
    import json, sys
    from neftune.data.formats import load_eval_examples
    from neftune.evaluate import heldout_loss
    from neftune.models import load_model_and_tokenizer

    examples = load_eval_examples(sys.argv[1]).examples
    losses = {}
    for directory in sys.argv[2:]:
        model, tokenizer = load_model_and_tokenizer(directory, for_training=False)  # an adapter is merged
        losses[directory] = heldout_loss(model, tokenizer, examples, max_length=512, batch_size=2)["loss"]
    print(json.dumps(losses))
    """
)


@pytest.mark.slow
def test_saved_models_reload_in_a_fresh_process(launched, data, cache):
    """The model, the LoRA adapter and the merged weights give, loaded anew, the held-out loss that
    training measured on the model it had in memory."""
    root = launched["root"]
    dirs = {
        str(root / "lora" / "model"): "lora",
        str(root / "lora" / "merged"): "lora",
        str(root / "full" / "model"): "full",
    }
    env = {**os.environ, **ENV, "NEFTUNE_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(data["eval"]), *dirs], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    for directory, run in dirs.items():
        trained = json.loads((root / run / "train_summary.json").read_text())["heldout_loss"]
        assert losses[directory] == pytest.approx(trained, abs=1e-4), directory


@pytest.mark.slow
def test_one_done_line_per_run_counting_every_ranks_tokens(launched):
    lines = [line for line in launched["stdout"].splitlines() if line.startswith("done: ")]
    assert len(lines) == len(RUNS)  # rank 0 alone reports, once per run
    for line, run in zip(lines, RUNS, strict=True):
        summary = json.loads((launched["root"] / run / "train_summary.json").read_text())
        assert summary["tokens_per_s"] > 0
        assert line.startswith(f"done: {summary['real_tokens']:,} tokens at {summary['tokens_per_s']:.0f} tokens/s")


# -- launch settings, in this process ----------------------------------------------------------


def test_an_fsdp_launch_on_cpus_says_it_trains_as_ddp(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="neftune"):
        assert device_arguments(cuda=False) == {"use_cpu": True}
    assert "runs them as DDP" in caplog.text
    assert device_arguments(cuda=True) == {"use_cpu": False}


def test_a_deepspeed_launch_on_cpus_runs_deepspeed_on_gloo(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else None)
    assert device_arguments(cuda=False) == {"use_cpu": False, "ddp_backend": "gloo", "dataloader_pin_memory": False}
    assert device_arguments(cuda=True) == {"use_cpu": False}


def test_a_deepspeed_launch_without_deepspeed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(
        ConfigError, match=r"^accelerate launch with a DeepSpeed config, but deepspeed is not installed"
    ):
        device_arguments(cuda=True)


# -- one GPU (run by benchmarks/gpu_check.py; skipped without CUDA) ------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_one_gpu_the_trainer_places_the_model_in_the_devices_dtype(data, tmp_path):
    overrides = ["model.name=tiny-random", f"data.train={data['train']}", f"data.eval={data['eval']}"]
    overrides += [f"train.output={tmp_path}", "train.max_steps=2", "train.batch_size=4", "train.progress=false"]
    metrics = run_training(load_config(Config, None, overrides)).metrics
    assert metrics["model"]["device"] == "cuda:0"  # loaded on the CPU, placed by the Trainer
    assert metrics["model"]["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert (metrics["world_size"], metrics["distributed_type"]) == (1, "NO")
    assert metrics["tokens_per_s"] > 0 and math.isfinite(metrics["heldout_loss"])


@pytest.mark.cuda
@needs_cuda
def test_one_gpu_noise_is_per_example_and_per_rank(monkeypatch):
    model = build_tiny_model().cuda().train()
    ids = torch.randint(0, 250, (1, 30), generator=torch.Generator().manual_seed(0)).cuda()
    position_ids = torch.cat([torch.arange(10), torch.arange(20)])[None].cuda()  # two packed examples
    noise = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with attach(model, alpha=5.0, seed=3) as handle, record_noise(model) as records:
            handle.set_step(1)
            model(input_ids=ids, position_ids=position_ids)
        noise[rank] = records[0]["noise"][0]
    lengths = torch.tensor([10.0] * 10 + [20.0] * 20, device="cuda")
    for delta in noise.values():
        ratio = delta.abs().amax(-1) / (5.0 / torch.sqrt(lengths * 64))  # each example's own bound
        assert ratio.max() <= 1 + 1e-4 and ratio[:10].max() > 0.8 and ratio[10:].max() > 0.8
    assert not torch.allclose(noise["0"], noise["1"])
