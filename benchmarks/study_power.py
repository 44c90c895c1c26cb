"""The power calculation behind the study preset's IFEval subset (docs/experiments/study.md).

    python benchmarks/study_power.py

It prints, in points, the smallest true difference in IFEval prompt-level strict accuracy that the
verdict's pooled test detects in 80% of simulated experiments, for several subset sizes, for the
study's design (3 seeds, 3 alphas Holm-corrected) and two others, under two assumptions about how
often two equally good models disagree on a prompt (the demo measured 12.5% between its two baseline
seeds).  See :mod:`neftune.stats.power`.
"""

from __future__ import annotations

from neftune.stats.power import detectable_effect

SIZES = (24, 48, 96, 192, 541)
DISCORDANCE = (0.05, 0.15)
SEED_SD = 0.02  # run-to-run spread of the effect itself, in proportion units (2 points)


DESIGNS = ((3, 3), (3, 1), (5, 3))  # (seeds, alphas tested)


def main() -> None:
    columns = [(s, a, d) for s, a in DESIGNS for d in DISCORDANCE]
    print("| prompts | " + " | ".join(f"{s} seeds, {a} α, A/A disagreement {d:.0%}" for s, a, d in columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for n in SIZES:
        cells = []
        for seeds, arms, d in columns:
            mde = detectable_effect(prompts=n, seeds=seeds, discordance=d, seed_sd=SEED_SD, arms=arms, sims=2000)
            cells.append("none" if mde is None else f"{100 * mde:.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
