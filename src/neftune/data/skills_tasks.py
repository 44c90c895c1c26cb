"""The task families of ``builtin:skills``: vocabulary, how each family draws its values and
computes the answer, and the phrasings that state the task (train phrasings first, the held-out ones
last; see :mod:`neftune.data.builtin`).
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FAMILIES", "Family"]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_WORDS = _words(
    "apple garden window silver planet rabbit orange pencil castle forest bridge candle mirror yellow "
    "winter summer button dragon guitar island jacket kitten ladder monkey number pepper rocket tunnel "
    "violet wallet banana coffee doctor engine flower hammer letter marble needle parrot puzzle ribbon "
    "school spider teapot thunder travel basket cookie dinner helmet lemon music ocean paper river shadow "
    "sugar table tiger water cloud stone bread"
)
_ITEMS = _words(
    "apples pears plums grapes lemons cherries carrots onions potatoes cats dogs horses rabbits ducks "
    "chairs lamps books cups spoons pens keys coins shoes hats scarves gloves boats trains bikes"
)
_NAMES = _words(
    "Anna Ben Carla David Elena Frank Grace Hugo Iris Jack Kim Leo Maya Nora Omar Paul Rosa Sam Tara Victor"
)
_DOMAINS = _words("example.com mail.org post.net inbox.io letters.co")
_ADJECTIVES = _words("red small old heavy bright quiet new wooden round blue")
_PLACES = _words("home outside downstairs upstairs today yesterday again early")
_VERBS = _words("found painted carried bought washed moved fixed counted")
_UNITS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
)
_ACRONYM_WORDS = _words(
    "global data network open source national energy research council digital media system public health "
    "service central travel agency united space science market office world trade access control"
)
_EMAIL_SENTENCES = (
    "You can reach {name} at {email} during office hours.",
    "Please send the signed form to {email} before Friday.",
    "For questions about the event, write to {email}.",
    "{name} changed her address to {email} last week.",
    "The invoice came from {email} this morning.",
)
_NUMBER_SENTENCES = (
    "The train leaves in {n} minutes.",
    "{name} bought {n} apples at the market.",
    "Our team has {n} members this year.",
    "The parcel weighs {n} kilograms.",
    "There were {n} people waiting at the door.",
)


@dataclass(frozen=True)
class Family:
    """One kind of task: its name, its phrasings, and ``draw(rng) -> (fields, answer)``."""

    name: str
    phrasings: tuple[str, ...]
    draw: Callable[[random.Random], tuple[dict[str, str], str]]
    case_sensitive: bool = False


def _numbers(rng: random.Random, low: int, high: int) -> list[int]:
    return rng.sample(range(low, high + 1), rng.randint(4, 6))


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.randint(2, 9)} {rng.choice(_ADJECTIVES)} "
        f"{rng.choice(_ITEMS)} {rng.choice(_PLACES)}."
    )


def _draw_add(rng: random.Random) -> tuple[dict[str, str], str]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return {"a": str(a), "b": str(b)}, str(a + b)


def _draw_subtract(rng: random.Random) -> tuple[dict[str, str], str]:
    a = rng.randint(20, 199)
    b = rng.randint(1, a)
    return {"a": str(a), "b": str(b)}, str(a - b)


def _draw_multiply(rng: random.Random) -> tuple[dict[str, str], str]:
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    return {"a": str(a), "b": str(b)}, str(a * b)


def _draw_reverse(rng: random.Random) -> tuple[dict[str, str], str]:
    word = rng.choice(_WORDS)
    return {"w": word}, word[::-1]


def _draw_upper(rng: random.Random) -> tuple[dict[str, str], str]:
    text = f"{rng.choice(_ADJECTIVES)} {rng.choice(_WORDS)}"
    return {"s": text}, text.upper()


def _draw_lower(rng: random.Random) -> tuple[dict[str, str], str]:
    words = [rng.choice(_ADJECTIVES), rng.choice(_WORDS)]
    text = " ".join(w.upper() if rng.random() < 0.5 else w.title() for w in words)
    return {"s": text}, text.lower()


def _draw_sort(rng: random.Random) -> tuple[dict[str, str], str]:
    numbers = _numbers(rng, 1, 99)
    return {"xs": ", ".join(map(str, numbers))}, ", ".join(map(str, sorted(numbers)))


def _draw_max(rng: random.Random) -> tuple[dict[str, str], str]:
    numbers = _numbers(rng, 1, 999)
    return {"xs": ", ".join(map(str, numbers))}, str(max(numbers))


def _draw_count_items(rng: random.Random) -> tuple[dict[str, str], str]:
    items = rng.sample(_ITEMS, rng.randint(3, 9))
    return {"items": ", ".join(items)}, str(len(items))


def _draw_count_letter(rng: random.Random) -> tuple[dict[str, str], str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(word)
    return {"w": word, "c": letter}, str(word.count(letter))


def _draw_convert(rng: random.Random) -> tuple[dict[str, str], str]:
    big, small, factor = rng.choice(_UNITS)
    x = rng.randint(2, 20)
    return {"x": str(x), "u1": big, "u2": small}, str(x * factor)


def _draw_email(rng: random.Random) -> tuple[dict[str, str], str]:
    name = rng.choice(_NAMES)
    email = f"{name.lower()}.{rng.choice(_WORDS)}@{rng.choice(_DOMAINS)}"
    return {"s": rng.choice(_EMAIL_SENTENCES).format(name=name, email=email)}, email


def _draw_number(rng: random.Random) -> tuple[dict[str, str], str]:
    n = str(rng.randint(2, 500))
    return {"s": rng.choice(_NUMBER_SENTENCES).format(name=rng.choice(_NAMES), n=n)}, n


def _draw_date(rng: random.Random) -> tuple[dict[str, str], str]:
    year, month = rng.randint(1990, 2030), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return {"iso": f"{year:04d}-{month:02d}-{day:02d}"}, f"{day:02d}/{month:02d}/{year:04d}"


def _draw_first_word(rng: random.Random) -> tuple[dict[str, str], str]:
    sentence = _sentence(rng)
    return {"s": sentence}, sentence.split()[0]


def _draw_last_word(rng: random.Random) -> tuple[dict[str, str], str]:
    sentence = _sentence(rng)
    return {"s": sentence}, sentence.split()[-1].rstrip(".")


def _draw_acronym(rng: random.Random) -> tuple[dict[str, str], str]:
    words = rng.sample(_ACRONYM_WORDS, rng.randint(3, 4))
    return {"p": " ".join(w.title() for w in words)}, "".join(w[0].upper() for w in words)


def _draw_parity(rng: random.Random) -> tuple[dict[str, str], str]:
    n = rng.randint(1, 999)
    return {"n": str(n)}, "even" if n % 2 == 0 else "odd"


FAMILIES: tuple[Family, ...] = (
    Family(
        "addition",
        (
            "What is {a} + {b}?",
            "Add {a} and {b}.",
            "Calculate the sum of {a} and {b}.",
            "What do you get when you add {a} to {b}?",
            "Compute {a} plus {b}.",
            "Find the total of {a} and {b}.",
        ),
        _draw_add,
    ),
    Family(
        "subtraction",
        (
            "What is {a} - {b}?",
            "Subtract {b} from {a}.",
            "Calculate {a} minus {b}.",
            "What is the difference between {a} and {b}?",
            "Take {b} away from {a}. What is left?",
            "How much is {a} minus {b}?",
        ),
        _draw_subtract,
    ),
    Family(
        "multiplication",
        (
            "What is {a} times {b}?",
            "Multiply {a} by {b}.",
            "What is the product of {a} and {b}?",
            "Calculate {a} * {b}.",
            "Compute {a} multiplied by {b}.",
            "How much is {a} x {b}?",
        ),
        _draw_multiply,
    ),
    Family(
        "reverse_word",
        (
            'Reverse the word "{w}".',
            'Write "{w}" backwards.',
            'Spell "{w}" in reverse order.',
            'What is "{w}" spelled backwards?',
            'Give the letters of "{w}" in reverse order.',
            'Turn the word "{w}" around, last letter first.',
        ),
        _draw_reverse,
    ),
    Family(
        "uppercase",
        (
            'Convert "{s}" to uppercase.',
            'Write "{s}" in capital letters.',
            'Rewrite "{s}" using only uppercase letters.',
            'Make "{s}" all caps.',
            'Change every letter of "{s}" to upper case.',
            'Put "{s}" in block capitals.',
        ),
        _draw_upper,
        case_sensitive=True,
    ),
    Family(
        "lowercase",
        (
            'Convert "{s}" to lowercase.',
            'Write "{s}" in small letters.',
            'Rewrite "{s}" using only lowercase letters.',
            'Make "{s}" all lowercase.',
            'Change every letter of "{s}" to lower case.',
            'Put "{s}" in lower case.',
        ),
        _draw_lower,
        case_sensitive=True,
    ),
    Family(
        "sort_numbers",
        (
            "Sort these numbers from smallest to largest: {xs}.",
            "Put these numbers in ascending order: {xs}.",
            "Arrange {xs} in increasing order.",
            "List the numbers {xs} from lowest to highest.",
            "Order the following numbers, smallest first: {xs}.",
            "Rearrange these numbers so that they go up: {xs}.",
        ),
        _draw_sort,
    ),
    Family(
        "max_number",
        (
            "What is the largest number in this list: {xs}?",
            "Which is the biggest number: {xs}?",
            "Find the maximum of {xs}.",
            "Pick the highest number from {xs}.",
            "Among {xs}, which number is greatest?",
            "Name the largest value in {xs}.",
        ),
        _draw_max,
    ),
    Family(
        "count_items",
        (
            "How many items are in this list: {items}?",
            "Count the items in the list: {items}.",
            "How many things are listed here: {items}?",
            "Tell me how many entries this list has: {items}.",
            "What is the number of items in the list {items}?",
            "How long is this list: {items}?",
        ),
        _draw_count_items,
    ),
    Family(
        "count_letter",
        (
            'How many times does the letter "{c}" appear in "{w}"?',
            'Count the letter "{c}" in the word "{w}".',
            'In the word "{w}", how many times does "{c}" occur?',
            'Count how often "{c}" occurs in "{w}".',
            'How often is the letter "{c}" found in "{w}"?',
            'What is the number of "{c}" letters in "{w}"?',
        ),
        _draw_count_letter,
    ),
    Family(
        "unit_conversion",
        (
            "Convert {x} {u1} to {u2}.",
            "How many {u2} are in {x} {u1}?",
            "Express {x} {u1} in {u2}.",
            "What is {x} {u1} in {u2}?",
            "{x} {u1} equals how many {u2}?",
            "Change {x} {u1} into {u2}.",
        ),
        _draw_convert,
    ),
    Family(
        "extract_email",
        (
            "Extract the email address from this sentence: {s}",
            "What email address appears in the following text? {s}",
            "Find the email address in: {s}",
            "Pull out the email address mentioned here: {s}",
            "Which email address does this sentence contain? {s}",
            "Copy the email address out of this text: {s}",
        ),
        _draw_email,
    ),
    Family(
        "extract_number",
        (
            "What number appears in this sentence: {s}",
            "Extract the number from the sentence: {s}",
            "Find the number in this text: {s}",
            "Which number is mentioned here? {s}",
            "Pick out the number in the following sentence: {s}",
            "Pull the numeric value out of this sentence: {s}",
        ),
        _draw_number,
    ),
    Family(
        "format_date",
        (
            "Rewrite the date {iso} in DD/MM/YYYY format.",
            "Convert {iso} to day/month/year (DD/MM/YYYY).",
            "Write {iso} as DD/MM/YYYY.",
            "Format the date {iso} as DD/MM/YYYY.",
            "Change {iso} into the DD/MM/YYYY format.",
            "How is {iso} written in DD/MM/YYYY form?",
        ),
        _draw_date,
    ),
    Family(
        "first_word",
        (
            "What is the first word of this sentence: {s}",
            "Give the first word in: {s}",
            'Which word comes first in the sentence "{s}"?',
            "Tell me the opening word of: {s}",
            "Return the word that starts this sentence: {s}",
            "Name the first word of the following sentence: {s}",
        ),
        _draw_first_word,
    ),
    Family(
        "last_word",
        (
            "What is the last word of this sentence: {s}",
            "Give the final word in: {s}",
            'Which word comes last in the sentence "{s}"?',
            "Tell me the closing word of: {s}",
            "Return the word that ends this sentence: {s}",
            "Name the last word of the following sentence: {s}",
        ),
        _draw_last_word,
    ),
    Family(
        "acronym",
        (
            'Write the acronym for "{p}".',
            'What is the acronym of "{p}"?',
            'Form an acronym from the first letters of "{p}".',
            'Abbreviate "{p}" using its initials.',
            'Give the initialism for "{p}".',
            'Shorten "{p}" to its capital initials.',
        ),
        _draw_acronym,
    ),
    Family(
        "parity",
        (
            "Is {n} even or odd?",
            "Tell me whether {n} is odd or even.",
            "Is the number {n} odd or even?",
            "Say if {n} is even or odd.",
            "Decide whether {n} is an even or an odd number.",
            "Even or odd: {n}?",
        ),
        _draw_parity,
    ),
)
"""The task families; each lists its train phrasings first and its held-out ones last."""
