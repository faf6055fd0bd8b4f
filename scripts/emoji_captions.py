"""Captions for emoji: English noun phrases from CLDR short names ("a turtle", "an ox", "grapes").

Used by scripts/prepare_emoji.py; kept apart so the article rules can be read and tested on their own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Emoji:
    concept: str        # CLDR short name, e.g. "turtle"
    slug: str           # file-name-safe form from unicode-emoji-json, e.g. "red_apple"
    char: str           # the emoji itself
    category: str       # Unicode emoji group, e.g. "Animals & Nature"
    subcategory: str    # Unicode emoji subgroup, e.g. "animal-reptile"
    image: str          # file name under img/<style>/64/ in the emoji-datasource tarballs
    added_in: str       # emoji version that introduced it


# English article rules for CLDR names. The article follows the sound of the first word, not its letter.
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")
_YOU_SOUND = ("uni", "use", "usu", "ute", "uku", "eu", "ewe")          # a unicorn, a euro banknote, a ewe
_VOWEL_LETTERS = set("aefhilmnorsx")                                   # letters whose name starts with a vowel
_SINGULAR_S = {"rhinoceros", "tennis", "lacrosse"}                     # end in -s but take no plural reading
_PLURAL_WORDS = {"people", "men", "women", "children"}
_PERSON = _PLURAL_WORDS | {"person", "man", "woman", "child", "boy", "girl"}
# Names that read as mass nouns, activities or adjectives: "a sushi" or "a locked" would be wrong.
_NO_ARTICLE = {
    "sushi", "spaghetti", "bread", "popcorn", "candy", "custard", "fondue", "bacon", "salt", "butter", "mate",
    "ice", "wood", "fog", "foggy", "cooked rice", "curry rice", "sake", "high voltage", "cooking", "oden",
    "falafel", "dna", "construction", "camping", "bowling", "badminton", "ping pong", "field hockey",
    "ice hockey", "lacrosse", "tennis", "mount fuji", "locked", "unlocked", "locked with key", "locked with pen",
    "horse racing", "santa claus", "mrs. claus", "mx claus",
}
_SPELLED = {"AB", "ATM", "CL", "ID", "NG", "SOS", "VS"}                  # read letter by letter: "an SOS button"
_DEFINITE = {"statue of liberty", "tokyo tower", "milky way", "kaaba"}
_HEAD_CUT = re.compile(r":| with | without | of | on | in | behind | showing | at | over ")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for the phrase, by the sound of its first word ("an ox", "a unicorn", "an x-ray")."""
    first = phrase.strip().split(" ")[0]
    word = first.lower()
    if first in _SPELLED:
        return "an" if word[0] in _VOWEL_LETTERS else "a"
    digits = re.match(r"\d+", word)
    if digits:  # "an 8 ball", "an 11-year", "a 1st place medal"
        d = digits.group()
        return "an" if d[0] == "8" or (len(d) in (2, 5) and d[:2] in ("11", "18")) else "a"
    if len(word) == 1 or (len(word) > 1 and word[1] == "-" and word[0].isalpha()):  # "an x-ray", "a T-Rex"
        return "an" if word[0] in _VOWEL_LETTERS else "a"
    if word.startswith(_SILENT_H):
        return "an"
    if word.startswith(_YOU_SOUND) or word == "one" or word.startswith("one-"):
        return "a"
    return "an" if word[0] in "aeiou" else "a"


def is_plural(name: str) -> bool:
    """Whether the head noun of a CLDR name is plural ("grapes", "nest with eggs" -> no, "people hugging")."""
    head = _HEAD_CUT.split(name.lower(), maxsplit=1)[0].split()
    if not head:
        return False
    # "woman lifting weights": a person's noun comes before the participle ("flower playing cards" is plural)
    participle = next((i for i, w in enumerate(head) if i and w.endswith("ing") and head[i - 1] in _PERSON), None)
    head = head[:participle]
    if _PLURAL_WORDS.intersection(head):
        return True
    last = head[-1]
    if last in _SINGULAR_S:
        return False
    return last.endswith("s") and not last.endswith(("ss", "us"))


def with_article(name: str) -> str:
    """The name as a noun phrase: "a turtle", "an ox", "grapes", "sushi", "the Statue of Liberty"."""
    low = name.lower()
    if low in _DEFINITE:
        return f"the {name}"
    if low in _NO_ARTICLE or is_plural(name) or "o’clock" in low or low.endswith("-thirty"):
        return name
    return f"{indefinite_article(name)} {name}"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def single_captions(concept: str, style: str) -> list[str]:
    """All caption variants of one emoji; the trainer samples one per step."""
    noun = with_article(concept)
    return _unique([concept, noun, f"{indefinite_article(concept)} {concept} emoji",
                    f"{concept}, {style} style", f"an emoji of {noun}"])


# Right-hand emoji an animal or person can be "playing": games by the name of the game, instruments with "the".
GAMES = {
    "basketball": "basketball", "baseball": "baseball", "softball": "softball", "volleyball": "volleyball",
    "soccer ball": "soccer", "american football": "american football", "rugby football": "rugby",
    "tennis": "tennis", "badminton": "badminton", "ping pong": "ping pong", "field hockey": "field hockey",
    "ice hockey": "ice hockey", "lacrosse": "lacrosse", "cricket game": "cricket", "video game": "video games",
    "pool 8 ball": "pool", "chess pawn": "chess", "game die": "dice",
}


def can_play(e: Emoji) -> bool:
    return e.subcategory.startswith("animal-") or e.category == "People & Body"


def playing(left: Emoji, right: Emoji) -> str | None:
    """ "a turtle playing basketball" when the left emoji can play and the right one is a game or instrument."""
    if not can_play(left):
        return None
    if right.concept in GAMES:
        return f"{with_article(left.concept)} playing {GAMES[right.concept]}"
    if right.subcategory == "musical-instrument":
        return f"{with_article(left.concept)} playing the {right.concept}"
    return None


def pair_captions(left: Emoji, right: Emoji, style: str) -> list[str]:
    a, b = with_article(left.concept), with_article(right.concept)
    verb = playing(left, right)
    return _unique([f"{a} and {b}", f"{left.concept} and {right.concept}", f"{a} next to {b}",
                    f"{a} and {b}, {style} style"] + ([verb, f"{verb}, {style} style"] if verb else []))
