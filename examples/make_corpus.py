"""Procedural English corpus for the bundled tiny LFM2 models (`tiny`, `tiny-moe`).

Every document is generated here from small word lists and sentence templates: short stories, simple facts,
dialogues, and ChatML chat examples (some with a system turn, a few with a tool list and a tool call). The
facts come from one fixed table, so they agree across documents and a small model can learn them.
Generation is deterministic for a given seed; the training split and the held-out split use different seeds,
and held-out documents that also occur verbatim in the training split are dropped.

Licence: this script and the text it generates are part of lfm-export, Apache-2.0. No third-party text is used.

    python examples/make_corpus.py --out build/tiny-corpus     # writes train.txt / heldout.txt
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

TRAIN_SEED = 20250101
HELDOUT_SEED = 20250202
N_TRAIN = 16000
N_HELDOUT = 400

BOS = "<|startoftext|>"
EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ---- word lists -------------------------------------------------------------------------------------------
NAMES = {
    "Tom": "he",
    "Anna": "she",
    "Ben": "he",
    "Lily": "she",
    "Max": "he",
    "Mia": "she",
    "Sam": "he",
    "Zoe": "she",
    "Leo": "he",
    "Emma": "she",
    "Jack": "he",
    "Lucy": "she",
    "Finn": "he",
    "Ella": "she",
    "Noah": "he",
    "Rosa": "she",
    "Omar": "he",
    "Nina": "she",
    "Theo": "he",
    "Ivy": "she",
    "Hugo": "he",
    "Maya": "she",
    "Oscar": "he",
    "Clara": "she",
    "Felix": "he",
    "Alice": "she",
    "Ravi": "he",
    "Sofia": "she",
    "Luke": "he",
    "Hannah": "she",
}
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}

# name: (sound, home, food, legs)
ANIMALS = {
    "cat": ("meow", "in a house", "fish", "four"),
    "dog": ("woof", "in a house", "meat", "four"),
    "cow": ("moo", "on a farm", "grass", "four"),
    "duck": ("quack", "on a pond", "seeds", "two"),
    "sheep": ("baa", "on a farm", "grass", "four"),
    "pig": ("oink", "on a farm", "corn", "four"),
    "owl": ("hoot", "in a tree", "mice", "two"),
    "frog": ("ribbit", "near a pond", "flies", "four"),
    "horse": ("neigh", "in a stable", "hay", "four"),
    "lion": ("roar", "on the grassland", "meat", "four"),
    "bee": ("buzz", "in a hive", "nectar", "six"),
    "mouse": ("squeak", "in a hole", "cheese", "four"),
    "bird": ("tweet", "in a nest", "worms", "two"),
    "bear": ("growl", "in a cave", "honey", "four"),
    "rabbit": ("sniff", "in a burrow", "carrots", "four"),
    "fox": ("yip", "in the forest", "berries", "four"),
    "goat": ("bleat", "on a hill", "grass", "four"),
    "hen": ("cluck", "on a farm", "seeds", "two"),
    "snake": ("hiss", "in the grass", "eggs", "no"),
    "wolf": ("howl", "in the forest", "meat", "four"),
    "donkey": ("bray", "on a farm", "hay", "four"),
    "crow": ("caw", "in a tree", "nuts", "two"),
    "turkey": ("gobble", "on a farm", "corn", "two"),
    "squirrel": ("chatter", "in a tree", "nuts", "four"),
}
ADJECTIVES = [
    "little",
    "big",
    "happy",
    "brave",
    "kind",
    "shy",
    "curious",
    "sleepy",
    "clever",
    "funny",
    "gentle",
    "quiet",
]
PLACES = [
    "small house",
    "quiet village",
    "green forest",
    "busy town",
    "big farm",
    "warm cottage",
    "sunny garden",
    "little house by the sea",
    "old castle",
    "snowy hill",
]
LANDMARKS = [
    "river",
    "old tree",
    "big rock",
    "red barn",
    "school",
    "bridge",
    "park",
    "lake",
    "market",
    "hill",
]
OBJECTS = {
    "ball": ["red", "blue", "small", "bouncy"],
    "box": ["wooden", "blue", "tiny", "heavy"],
    "key": ["shiny", "golden", "old", "small"],
    "book": ["old", "green", "big", "magic"],
    "hat": ["green", "tall", "funny", "yellow"],
    "kite": ["red", "long", "bright", "paper"],
    "map": ["old", "torn", "secret", "big"],
    "shell": ["pink", "smooth", "white", "shiny"],
    "cup": ["blue", "chipped", "tiny", "silver"],
    "bell": ["golden", "little", "loud", "brass"],
    "coin": ["silver", "shiny", "old", "gold"],
    "flower": ["yellow", "pretty", "purple", "tall"],
    "drum": ["red", "small", "loud", "round"],
    "boat": ["wooden", "paper", "little", "blue"],
    "feather": ["soft", "white", "long", "blue"],
    "stone": ["smooth", "round", "grey", "shiny"],
}
ACTIVITIES = [
    ("play in the park", "played in the park"),
    ("read books", "read books"),
    ("sing songs", "sang songs"),
    ("draw pictures", "drew pictures"),
    ("run in the grass", "ran in the grass"),
    ("build sand castles", "built sand castles"),
    ("look at the stars", "looked at the stars"),
    ("swim in the lake", "swam in the lake"),
    ("pick flowers", "picked flowers"),
    ("fly a kite", "flew a kite"),
    ("bake cookies", "baked cookies"),
    ("climb trees", "climbed trees"),
    ("plant seeds", "planted seeds"),
    ("watch the clouds", "watched the clouds"),
    ("ride a bike", "rode a bike"),
    ("play hide and seek", "played hide and seek"),
]
EMOTIONS = ["happy", "glad", "proud", "excited", "surprised", "thankful"]
FOODS = [
    "apples",
    "bread",
    "cheese",
    "carrots",
    "milk",
    "eggs",
    "rice",
    "soup",
    "cake",
    "honey",
    "pears",
    "tea",
    "potatoes",
    "tomatoes",
    "butter",
    "oranges",
    "beans",
    "grapes",
    "lemons",
    "jam",
]
SHOPS = ["market", "bakery", "shop", "farm", "store"]
FEELINGS = ["fine", "good", "well", "happy", "great"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "warm", "cold"]
CITIES = ["Paris", "London", "Tokyo", "Rome", "Cairo", "Lima", "Oslo", "Delhi"]

COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "the sun": "yellow",
    "a banana": "yellow",
    "an apple": "red",
    "coal": "black",
    "a carrot": "orange",
    "the sea": "blue",
    "a leaf": "green",
    "milk": "white",
    "a cherry": "red",
    "a lemon": "yellow",
    "chocolate": "brown",
    "a plum": "purple",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "day": "night",
    "happy": "sad",
    "open": "closed",
    "old": "new",
    "light": "dark",
    "wet": "dry",
    "early": "late",
    "full": "empty",
}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items())})
SEASONS = {"winter": "cold", "summer": "hot", "spring": "mild", "autumn": "cool"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Answer in short sentences."]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def a_an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# ---- documents ------------------------------------------------------------------------------------------------
def story(r: random.Random, animal: str | None = None) -> str:
    name = r.choice(list(NAMES))
    he, him, his = PRONOUNS[NAMES[name]]
    friend = r.choice([n for n in NAMES if n != name])
    animal = animal or r.choice(list(ANIMALS))
    obj = r.choice(list(OBJECTS))
    obj_adj = r.choice(OBJECTS[obj])
    act, act_past = r.choice(ACTIVITIES)
    act2_past = r.choice([a[1] for a in ACTIVITIES if a[1] != act_past])
    s = [
        r.choice(["Once upon a time, there was", "One day, there was", "There once was"])
        + f" {a_an(r.choice(ADJECTIVES))} {animal} named {name}.",
        f"{name} lived in {a_an(r.choice(PLACES))} near the {r.choice(LANDMARKS)}.",
        f"Every day, {he} liked to {act}.",
    ]
    if r.random() < 0.5:
        s.append(f"{cap(his)} best friend was {friend}.")
    s.append(f"One morning, {name} found {a_an(obj_adj)} {obj} near the {r.choice(LANDMARKS)}.")
    if r.random() < 0.5:
        s.append(f"{cap(he)} picked it up and looked at it.")
    s.append(f'"What a {r.choice(["nice", "pretty", "strange", "lovely"])} {obj}!" said {name}.')
    s.append(f"{cap(he)} ran to show it to {friend}.")
    if r.random() < 0.5:
        s.append(f'{friend} smiled and said, "Let us play with it together."')
    s.append(f"They {act2_past} until the sun went down.")
    s.append(f"At the end of the day, {name} was very {r.choice(EMOTIONS)}.")
    if r.random() < 0.4:
        s.append("The end.")
    return " ".join(s)


DESTINATIONS = ["beach", "zoo", "mountain", "forest", "lake", "farm", "park", "museum", "garden", "river"]
SIGHTS = [
    "sleeping in the sun",
    "eating leaves",
    "jumping over a log",
    "swimming in the water",
    "looking for food",
    "playing with its baby",
    "sitting on a rock",
    "hiding behind a tree",
]
PET_PLACES = [
    "under the bed",
    "behind the door",
    "in the garden",
    "in the kitchen",
    "on the roof",
    "in a basket",
    "under the table",
    "in the shed",
]


def trip_story(r: random.Random) -> str:
    name, friend = r.sample(list(NAMES), 2)
    dest = r.choice(DESTINATIONS)
    food1, food2 = r.sample(FOODS, 2)
    animal = r.choice(list(ANIMALS))
    s = [
        f"{name} and {friend} went to the {dest} on a {r.choice(WEATHER)} day.",
        f"They took a {r.choice(['basket', 'bag', 'box'])} with {food1} and {food2}.",
        f"At the {dest}, they saw {a_an(r.choice(ADJECTIVES))} {animal}.",
        f"The {animal} was {r.choice(SIGHTS)}.",
        f'"Look at the {animal}!" said {friend}.',
    ]
    if r.random() < 0.5:
        s.append(
            f"Then they sat under a {r.choice(['big tree', 'red umbrella', 'old bridge'])} and ate the {food1}."
        )
    s.append(f"When the sky turned {r.choice(['orange', 'pink', 'dark', 'grey'])}, they walked home.")
    s.append(f'{name} said, "This was the best day ever!"')
    return " ".join(s)


def lost_pet_story(r: random.Random) -> str:
    name = r.choice(list(NAMES))
    he, _, his = PRONOUNS[NAMES[name]]
    pet = r.choice(["cat", "dog", "rabbit", "bird", "mouse", "duck"])
    first, second, last = r.sample(PET_PLACES, 3)
    s = [
        f"{name} had {a_an(r.choice(ADJECTIVES))} {pet}.",
        f"One night, the {pet} was gone!",
        f"{name} looked {first} and {second}, but the {pet} was not there.",
        f"{cap(he)} asked {his} {r.choice(['mother', 'father', 'sister', 'brother', 'grandmother'])} for help.",
        f"At last, {he} found the {pet} {last}.",
        f"The {pet} was {r.choice(['sleeping', 'eating', 'playing', 'hiding'])}.",
        f'{name} gave the {pet} a big hug and said, "Never run away again!"',
    ]
    return " ".join(s)


def _animal_facts(r: random.Random) -> list[str]:
    animal = r.choice(list(ANIMALS))
    sound, home, food, legs = ANIMALS[animal]
    facts = [
        f"A {animal} says {sound}.",
        f"A {animal} lives {home}.",
        f"A {animal} eats {food}.",
        f"A {animal} has {legs} legs.",
    ]
    r.shuffle(facts)
    return [f"Facts about the {animal}."] + facts[: r.randint(2, 4)]


def _color_facts(r: random.Random) -> list[str]:
    things = r.sample(list(COLORS), r.randint(3, 5))
    return ["Colors."] + [f"{cap(t)} is {COLORS[t]}." for t in things]


def _sum_facts(r: random.Random) -> list[str]:
    out = ["Numbers."]
    for _ in range(r.randint(3, 5)):
        a = r.randint(0, 10)
        b = r.randint(0, 10)
        out.append(f"{cap(NUMBERS[a])} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
    return out


def _sequence_facts(r: random.Random) -> list[str]:
    seq = DAYS if r.random() < 0.6 else MONTHS
    i = r.randrange(len(seq))
    out = ["Days of the week." if seq is DAYS else "Months of the year."]
    for k in range(r.randint(2, 4)):
        a, b = seq[(i + k) % len(seq)], seq[(i + k + 1) % len(seq)]
        out.append(f"After {a} comes {b}.")
    return out


def _opposite_facts(r: random.Random) -> list[str]:
    return ["Opposites."] + [f"The opposite of {w} is {OPPOSITES[w]}." for w in r.sample(list(OPPOSITES), 3)]


def _season_facts(r: random.Random) -> list[str]:
    return ["Seasons."] + [f"In {s} it is {SEASONS[s]}." for s in r.sample(list(SEASONS), r.randint(2, 4))]


def _counting_facts(r: random.Random) -> list[str]:
    if r.random() < 0.5:
        start = r.randint(0, 990)
        return ["Counting.", ", ".join(str(start + k) for k in range(r.randint(4, 8))) + "."]
    return ["Numbers."] + [f"The number after {n} is {n + 1}." for n in r.sample(range(999), r.randint(2, 4))]


FACT_TOPICS: list[Callable[[random.Random], list[str]]] = [
    _animal_facts,
    _animal_facts,
    _color_facts,
    _sum_facts,
    _sequence_facts,
    _opposite_facts,
    _season_facts,
    _counting_facts,
]


def facts(r: random.Random) -> str:
    return " ".join(r.choice(FACT_TOPICS)(r))


def dialogue(r: random.Random) -> str:
    a, b = r.sample(list(NAMES), 2)
    food1, food2 = r.sample(FOODS, 2)
    shop = r.choice(SHOPS)
    lines = [
        f"{a}: " + r.choice(["Hello", "Hi", "Good morning"]) + f", {b}! How are you today?",
        f"{b}: I am {r.choice(FEELINGS)}, thank you. And you?",
        f"{a}: I am {r.choice(FEELINGS)} too. Where are you going?",
        f"{b}: I am going to the {shop} to buy some {food1} and {food2}.",
    ]
    if r.random() < 0.6:
        lines.append(f"{a}: Can I come with you?")
        lines.append(
            f"{b}: " + r.choice(["Yes, of course! Let us go together.", "Sure! It is a nice day for a walk."])
        )
    else:
        lines.append(f"{a}: The weather is {r.choice(WEATHER)} today.")
        lines.append(f"{b}: Yes, it is. See you later, {a}!")
        lines.append(f"{a}: Goodbye, {b}!")
    return "\n".join(lines)


def _qa(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(11)
    if kind == 0:
        animal = r.choice(list(ANIMALS))
        return f"What does a {animal} say?", f"A {animal} says {ANIMALS[animal][0]}."
    if kind == 1:
        animal = r.choice(list(ANIMALS))
        return f"Where does a {animal} live?", f"A {animal} lives {ANIMALS[animal][1]}."
    if kind == 2:
        animal = r.choice(list(ANIMALS))
        return f"What does a {animal} eat?", f"A {animal} eats {ANIMALS[animal][2]}."
    if kind == 3:
        thing = r.choice(list(COLORS))
        return f"What color is {thing}?", f"{cap(thing)} is {COLORS[thing]}."
    if kind == 4:
        a, b = r.randint(0, 10), r.randint(0, 10)
        return (
            f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
            f"{cap(NUMBERS[a])} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
        )
    if kind == 5:
        i = r.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    if kind == 6:
        w = r.choice(list(OPPOSITES))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}."
    if kind == 7:
        animal = r.choice(list(ANIMALS))
        return f"Tell me a short story about a {animal}.", story(r, animal)
    if kind == 8:
        animal = r.choice(list(ANIMALS))
        return f"How many legs does a {animal} have?", f"A {animal} has {ANIMALS[animal][3]} legs."
    if kind == 9:
        n = r.randrange(999)
        return f"What number comes after {n}?", f"The number after {n} is {n + 1}."
    greeting = r.choice(["Hello!", "Hi!", "Hello, who are you?", "Hi, can you help me?"])
    return greeting, r.choice(
        [
            "Hello! I am a small assistant. How can I help you today?",
            "Hi! I am happy to help. What do you want to know?",
        ]
    )


Message = dict[str, str]


def chat_messages(r: random.Random) -> tuple[list[Message], list[dict] | None]:
    """(messages, tools) of one conversation: Q&A turns, sometimes a system turn, a few tool calls."""
    if r.random() < 0.06:
        city, weather = r.choice(CITIES), r.choice(WEATHER)
        messages = [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {
                "role": "assistant",
                "content": f'<|tool_call_start|>[get_weather(city="{city}")]<|tool_call_end|>',
            },
            {"role": "tool", "content": json.dumps({"weather": weather})},
            {"role": "assistant", "content": f"The weather in {city} is {weather}."},
        ]
        return messages, [WEATHER_TOOL]
    messages = [{"role": "system", "content": r.choice(SYSTEM_PROMPTS)}] if r.random() < 0.25 else []
    for _ in range(1 if r.random() < 0.7 else 2):
        q, a = _qa(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages, None


def render_chat(
    messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = False
) -> str:
    """What the bundled chat template renders (the tiny-model test checks that they agree)."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if tools:
        listed = ", ".join(t if isinstance(t, str) else json.dumps(t) for t in tools)
        system += ("\n" if system else "") + f"List of tools: <|tool_list_start|>[{listed}]<|tool_list_end|>"
    out = [BOS]
    if system:
        out.append(f"{IM_START}system\n{system}{IM_END}\n")
    for m in messages:
        content = m["content"]
        if m["role"] == "tool":
            content = f"<|tool_response_start|>{content}<|tool_response_end|>"
        out.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def chat(r: random.Random) -> str:
    return render_chat(*chat_messages(r))


def document(r: random.Random) -> str:
    x = r.random()
    if x < 0.35:
        return chat(r)
    if x < 0.5:
        text = story(r)
    elif x < 0.58:
        text = trip_story(r)
    elif x < 0.65:
        text = lost_pet_story(r)
    elif x < 0.85:
        text = facts(r)
    else:
        text = dialogue(r)
    return BOS + text + EOT


def generate_documents(seed: int, n: int) -> list[str]:
    """`n` documents from `seed`; each starts with `<|startoftext|>`, plain text ends with `<|endoftext|>`."""
    r = random.Random(seed)
    return [document(r) for _ in range(n)]


def splits(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> tuple[list[str], list[str]]:
    """(train, held-out); held-out documents that occur verbatim in train are replaced by fresh ones."""
    train = generate_documents(TRAIN_SEED, n_train)
    seen = set(train)
    r = random.Random(HELDOUT_SEED)
    heldout: list[str] = []
    while len(heldout) < n_heldout:
        d = document(r)
        if d not in seen:
            heldout.append(d)
            seen.add(d)
    return train, heldout


SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>")


def words(text: str) -> list[str]:
    """Lower-cased words of `text`, special tokens removed (how the word-level checks count)."""
    return re.findall(r"[a-z]+", SPECIAL_RE.sub(" ", text).lower())


def vocabulary(docs: list[str]) -> set[str]:
    return {w for d in docs for w in words(d)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/tiny-corpus"))
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--n-heldout", type=int, default=N_HELDOUT)
    args = ap.parse_args()
    train, heldout = splits(args.n_train, args.n_heldout)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("heldout", heldout)):
        (args.out / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
    print(
        f"wrote {len(train)} train / {len(heldout)} held-out documents to {args.out} "
        f"({len(vocabulary(train))} distinct words)"
    )


if __name__ == "__main__":
    main()
