"""`neftune compare`, `generate`, `eval` and `judge` end to end on a tiny random model."""

from __future__ import annotations

import json
import logging
import re
from html.parser import HTMLParser

import pytest
from tests.helpers import OpenAIStyleServer, chat_reply

from neftune.cli import main

SECRET = "sk-test-DO-NOT-LEAK-8c1f2e"
SMALL = [
    "--model",
    "tiny-random",
    "--max-steps",
    "6",
    "--eval-limit",
    "8",
    "--max-new-tokens",
    "8",
    "data.limit=64",
    "train.save_steps=3",
    "train.eval_steps=3",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def _cache(neftune_cache, monkeypatch):
    monkeypatch.setenv("NEFTUNE_CACHE", str(neftune_cache))


def _prefer_b(payload, nth, headers):
    assert headers.get("Authorization") == f"Bearer {SECRET}"
    return 200, chat_reply("B")


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def test_compare_end_to_end_resumes_and_never_writes_the_key(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "exp"
    with OpenAIStyleServer(_prefer_b) as server:
        args = [
            "compare",
            *SMALL,
            "--seeds",
            "0",
            "--output",
            str(out),
            "--judge",
            "http",
            "--judge-url",
            server.url,
            "--judge-model",
            "judge-model",
        ]
        assert main(args) == 0
        n_requests = len(server.requests)
        assert n_requests > 0

        results = json.loads((out / "results.json").read_text())
        names = [a["name"] for a in results["arms"]]
        assert names == ["alpha=0", "alpha=5", "alpha=10"]
        for arm in results["arms"]:
            assert arm["eval"]["heldout_loss"] > 0
            assert len(arm["eval"]["per_example"]["length_chars"]) == 8
            assert arm["train"]["loss_curve"]
        assert results["arms"][0]["judge"] is None
        for arm in results["arms"][1:]:
            judged = arm["judge"]
            assert judged["vs"] == "alpha=0" and judged["backend"] == "http"
            assert judged["n"] + judged["n_failed"] == 8

        html = (out / "report.html").read_text()
        parser = _Images()
        parser.feed(html)
        assert parser.srcs and all(src.startswith("data:image/png;base64,") for src in parser.srcs)
        assert (out / "report.md").exists() and any((out / "plots").glob("*.png"))
        outputs = json.loads((out / "arms" / "alpha5" / "outputs.json").read_text())
        assert {"instruction", "output", "generator", "dataset"} <= set(outputs[0])
        # each answer says whether it was cut off; the arm's share and the report follow from those flags
        cut = [int(o["reached_cap"]) for o in outputs]
        assert results["arms"][1]["eval"]["per_example"]["reached_cap"] == cut
        assert results["arms"][1]["eval"]["reached_cap"] == sum(cut) / len(cut)
        assert "cut off" in (out / "report.md").read_text()

        # nothing the run wrote contains the API key
        for path in out.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path

        # rerun: finished arms are reused, the judge answers from its cache
        (out / "arms" / "alpha10" / "arm.json").unlink()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="neftune"):
            assert main(args) == 0
        text = caplog.text
        assert "alpha=0: already finished" in text and "alpha=5: already finished" in text
        assert re.search(r"resuming from .*alpha10/checkpoints/checkpoint-6", text)
        assert len(server.requests) == n_requests


def test_generate_eval_judge_commands(tmp_path, tiny_model_dir, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--data", "builtin:skills", "--limit", "6", "--max-new-tokens", "6", "--no-progress"]
    assert main(["generate", "--model", str(tiny_model_dir), "--output", str(a), *common]) == 0
    records = json.loads(a.read_text())
    assert len(records) == 6 and all(set(r) >= {"instruction", "output", "generator", "dataset"} for r in records)
    b.write_text(json.dumps([{**r, "output": r["output"] + " and more words"} for r in records]))

    metrics_path = tmp_path / "m.json"
    assert (
        main(["eval", "--model", str(tiny_model_dir), "--outputs", str(a), "--output", str(metrics_path), *common]) == 0
    )
    metrics = json.loads(metrics_path.read_text())
    assert metrics["heldout"]["loss"] > 0 and "exact_match" in metrics["outputs"]

    capsys.readouterr()
    assert main(["judge", str(a), str(b), "--backend", "length", "--cache", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "win rate" in capsys.readouterr().out

    b.write_text(json.dumps(records[:3]))
    assert main(["judge", str(a), str(b), "--backend", "length", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neftune: error:") and "\n" not in err


def test_compare_holds_out_part_of_a_custom_training_set_it_cannot_spare(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    assert main(["compare", "--model", "tiny-random", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.eval_size=0.1 would hold out 1 of 1 usable examples, leaving none to train on" in err
    assert str(data) in err and "\n" not in err


def _run(args, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="neftune"):
        assert main(args) == 0
    return caplog.text


def test_compare_two_seeds_pairs_within_seed_pools_and_measures_the_aa_floor(tmp_path, caplog):
    out = tmp_path / "exp"
    _run(["compare", *SMALL, "--alphas", "5", "--seeds", "0,1", "--judge", "none", "--output", str(out)], caplog)
    results = json.loads((out / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"]}
    assert list(arms) == ["alpha=0,seed=0", "alpha=5,seed=0", "alpha=0,seed=1", "alpha=5,seed=1"]
    assert results["schema_version"] == 2 and results["primary"]["metric"] == "exact_match"
    analysis = results["analysis"]
    assert analysis["primary"] == "exact_match" and analysis["seeds"] == [0, 1]
    assert analysis["seed_variance_measured"] is True and list(analysis["pooled"]) == ["5"]
    em = analysis["pooled"]["5"]["exact_match"]
    assert em["role"] == "primary" and em["seeds"] == [0, 1]
    per_seed = []
    for seed in (0, 1):
        treated = arms[f"alpha=5,seed={seed}"]["eval"]["per_example"]["correct"]
        base = arms[f"alpha=0,seed={seed}"]["eval"]["per_example"]["correct"]
        per_seed.append(sum(t - b for t, b in zip(treated, base, strict=True)) / len(base))
    assert [s["estimate"] for s in em["per_seed"]] == pytest.approx(per_seed)
    assert em["estimate"] == pytest.approx(sum(per_seed) / 2)
    assert em["p_holm"] == pytest.approx(em["p_value"])  # one alpha: Holm leaves the primary test alone
    aa = analysis["aa"]["length_chars"]
    assert aa["measured"] and aa["pairs"][0]["seeds"] == [0, 1]
    md = (out / "report.md").read_text()
    verdict = md.split("## Verdict", 1)[1].split("##", 1)[0]
    assert "Primary metric: exact match (declared by builtin:skills)." in verdict
    assert any(
        phrase in verdict
        for phrase in ("does not show that NEFTune helped or hurt", "NEFTune helped:", "NEFTune hurt:", "Mixed result")
    )
    assert "A/A: baseline seeds against each other" in md and "seed 1 \u2212 seed 0" in md


def test_compare_rerun_with_other_settings_errors_retrains_or_regenerates(tmp_path, caplog, capsys):
    out = tmp_path / "exp"
    base = ["compare", *SMALL, "--alphas", "5", "--seeds", "0", "--judge", "none", "--output", str(out)]
    _run(base, caplog)
    capsys.readouterr()
    # a training setting changed: one line naming it and the ways out, nothing retrained or overwritten
    assert main([*base, "--lr", "1e-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("neftune: error: alpha=0 in ") and "(settings.train.lr: None -> 0.01)" in err
    assert "--output" in err and "--overwrite" in err
    assert json.loads((out / "results.json").read_text())["settings"]["lr"] != 0.01
    # --overwrite retrains exactly the arms whose settings changed (here both)
    text = _run([*base, "--lr", "1e-2", "--overwrite"], caplog)
    assert text.count("retraining it (--overwrite)") == 2 and "training (alpha=5" in text
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["lr"] == 0.01  # run details come from the arms' records
    # a generation setting changed: answers are generated again, nothing is retrained
    text = _run([*base, "--lr", "1e-2", "--max-new-tokens", "4"], caplog)
    assert text.count("answering the eval prompts again (training reused)") == 2
    assert "training (alpha=" not in text and "retraining" not in text
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["generation"]["max_new_tokens"] == 4
    stamp = json.loads((out / "arms" / "alpha5" / "fingerprint.json").read_text())
    assert stamp["generate"]["max_new_tokens"] == 4 and stamp["train"]["settings"]["train.lr"] == 0.01
    # unchanged: everything reused
    text = _run([*base, "--lr", "1e-2", "--max-new-tokens", "4"], caplog)
    assert text.count("already finished") == 2


def test_compare_answers_a_separate_prompt_set_and_measures_loss_on_the_heldout_data(tmp_path, caplog):
    """generate.prompts: the arms answer IFEval prompts while the held-out loss uses the skills split."""
    out = tmp_path / "exp"
    args = ["compare", *SMALL, "--alphas", "5", "--seeds", "0", "--output", str(out)]
    _run([*args, "--prompts", "builtin:ifeval", "--prompts-limit", "5"], caplog)
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["eval"] == "builtin:ifeval" and results["data"]["n_eval"] == 5
    assert results["data"]["heldout"] == "builtin:skills" and results["data"]["n_heldout"] == 8
    assert results["primary"]["metric"] == "ifeval_prompt_strict"
    for arm in results["arms"]:
        assert len(arm["eval"]["per_example"]["ifeval_prompt_strict"]) == 5
        # the held-out loss is the one training measured at its end on the same 8 skills examples
        summary = json.loads((out / "arms" / arm["name"].replace("=", "") / "train_summary.json").read_text())
        assert arm["eval"]["heldout_loss"] == summary["heldout_loss"]
        assert len(json.loads((out / "arms" / arm["name"].replace("=", "") / "outputs.json").read_text())) == 5
    assert "held-out loss on 8 examples (builtin:skills)" in (out / "report.md").read_text()
    # the prompt set is part of each arm's generation fingerprint: another subset regenerates, no retraining
    log = _run([*args, "--prompts", "builtin:ifeval", "--prompts-limit", "4"], caplog)
    assert "training (" not in log
    assert json.loads((out / "results.json").read_text())["data"]["n_eval"] == 4


def test_compare_preset_recipes(tmp_path, capsys):
    from neftune.compare_config import CompareConfig
    from neftune.config import load_config
    from neftune.config_io import recipe_names

    assert recipe_names() == ["demo", "skills", "study"]
    for name in recipe_names():  # every shipped recipe is a valid config
        cfg = load_config(CompareConfig, recipe=name)
        assert cfg.compare.output == f"runs/{name}" and len(cfg.compare.seeds) >= 2
    demo = load_config(CompareConfig, recipe="demo")
    assert (demo.data.train, demo.generate.prompts) == ("builtin:sharegpt_first", "builtin:ifeval")
    study = load_config(CompareConfig, recipe="study")
    assert study.compare.alphas == [5.0, 10.0, 15.0] and study.compare.seeds == [0, 1, 2]
    # a --config file and flags override the recipe, section by section
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  max_steps: 3\n")
    cfg = load_config(CompareConfig, extra, ["compare.seeds=0,1,2"], recipe="demo")
    assert cfg.train.max_steps == 3 and cfg.train.batch_size == demo.train.batch_size
    assert cfg.compare.seeds == [0, 1, 2] and cfg.generate.prompts == "builtin:ifeval"
    assert main(["compare", "--preset", "nope", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'; use one of demo, skills, study" in err and "Traceback" not in err
