"""Wording: articles, plurals, number words and the caption/question templates.

Several templates per fact so a model learns the fact, not one sentence.
Answers stay short and canonical ("3", "red", "top left", "yes", "a dog face").
"""

from __future__ import annotations

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Words after which the head noun has ended ("face with tears of joy").
_HEAD_ENDS = (" of ", " with ", " in ", " on ", " and ", " for ", " without ")
_IRREGULAR = {"fish": "fish", "sheep": "sheep", "mouse": "mice", "man": "men", "woman": "women",
              "person": "people", "child": "children", "foot": "feet", "tooth": "teeth",
              "leaf": "leaves", "knife": "knives", "t-shirt": "t-shirts"}


def _plural_word(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plural(name: str) -> str:
    """'dog face' -> 'dog faces', 'pair of trousers' -> 'pairs of trousers'."""
    cut = min((name.find(end) for end in _HEAD_ENDS if end in name), default=len(name))
    head, tail = name[:cut], name[cut:]
    words = head.split(" ")
    words[-1] = _plural_word(words[-1])
    return " ".join(words) + tail


def article(name: str) -> str:
    """'a dog face', 'an apple' (by spelling, which is right for these names)."""
    vowel = name[:1] in "aeiou" and not name.startswith(("uni", "use", "eu", "one"))
    return ("an " if vowel else "a ") + name


def counted(name: str, count: int) -> str:
    """'a red circle' or 'three red circles'."""
    return article(name) if count == 1 else f"{NUMBER_WORDS[count]} {plural(name)}"


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


SINGLE_CAPTIONS = {
    "shape": ("{a_name}", "a drawing of {a_name}", "{a_name} on a white background",
              "a photo of {a_name}", "a simple {name} shape", "a flat {name} icon"),
    "emoji": ("an emoji of {a_name}", "{a_name} emoji", "an icon of {a_name}",
              "a picture of {a_name}", "{a_name}", "a cartoon of {a_name}"),
    "clipart": ("a drawing of {a_name}", "clip art of {a_name}", "an illustration of {a_name}",
                "a cartoon of {a_name}", "a picture of {a_name}", "{a_name} on a white background"),
    "fashion": ("a grey picture of {a_name}", "a photo of {a_name}", "a black and white photo of {a_name}",
                "a low resolution photo of {a_name}", "{a_name}", "a small grey image of {a_name}"),
    "word": ('the word "{name}"', 'the word "{name}" written in {color}', 'text that says "{name}"',
             '"{name}" in {color} letters', 'a sign reading "{name}"'),
}

SCENE_CAPTIONS = ("{list}", "a picture of {list}", "an image showing {list}",
                  "{list} on a white background", "a drawing with {list}")
SCENE_WORD = (' and the word "{word}"', ', with "{word}" written in {color}', ' and the text "{word}"')

QUESTIONS = {
    "count": ("How many {plural} are there?", "How many {plural} can you see?",
              "Count the {plural}.", "What is the number of {plural} in the image?"),
    "count_total": ("How many objects are there in total?", "How many things are in the picture?"),
    "color": ("What colour is the {name}?", "What color is the {name}?", "Which colour is the {name}?"),
    "color_many": ("What colour are the {plural}?", "What color are the {plural}?"),
    "color_word": ("What colour is the word?", "What color is the text?"),
    "where": ("Where is the {name}?", "Where is the {name} in the image?", "In which part of the image is the {name}?"),
    "left_right": ("Is the {name} on the left or the right?", "Is the {name} on the left or right side?"),
    "top_bottom": ("Is the {name} at the top or the bottom?", "Is the {name} near the top or the bottom?"),
    "at": ("What is in the {cell}?", "What object is at the {cell}?", "What can you see in the {cell}?"),
    "only": ("What is shown in the image?", "What is in the picture?", "Describe the image in a few words."),
    "left_of": ("Is the {a} to the left of the {b}?", "Is the {a} left of the {b}?"),
    "right_of": ("Is the {a} to the right of the {b}?", "Is the {a} right of the {b}?"),
    "above": ("Is the {a} above the {b}?", "Is the {a} higher than the {b}?"),
    "below": ("Is the {a} below the {b}?", "Is the {a} lower than the {b}?"),
    "nearest": ("Which object is nearest to the {name}?", "What is closest to the {name}?"),
    "present": ("Is there {a_name} in the image?", "Do you see {a_name}?",
                "Does the image contain {a_name}?", "Is there {a_name}?"),
    "text_present": ("Is there any text in the image?", "Is anything written in the image?"),
    "read": ("What word is written in the image?", "What does the text say?",
             "Read the word in the image.", "What is written here?"),
}
