"""How a question is put to the model and how its reply is read: the GRACE authors' protocol (default) or LLaVA's.

GRACE (the release table): greedy decoding, 8 new tokens (MMMU open questions: 32);
    Context: <hint>            (only when the benchmark gives one)
    Question: <question>
    Options:
    (A) <option>
    ...
    Answer with only the option letter.
The answer is the first valid option letter anywhere in the upper-cased reply (MMStar: the last, preferring
standalone letters); HallusionBench asks for Yes/No and takes the first yes- or no-word; MMMU's open questions
are matched as numbers or normalised text.

LLaVA (`--protocol llava`): the hint, question and "A. option" lines with LLaVA-1.5's suffix, a reply read by
its leading letter, 128 new tokens.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from .item import EvalItem

ANSWER_LETTER = "Answer with only the option letter."
ANSWER_LETTER_ABCD = "Answer with only the option letter (A, B, C, or D)."
ANSWER_YES_NO = "Answer with only 'Yes' or 'No'."
ANSWER_SHORT = "Answer with a short phrase or number only."
LLAVA_LETTER = "Answer with the option's letter from the given choices directly."
LLAVA_SHORT = "Answer the question using a single word or phrase."

_IMAGE_TAG = re.compile(r"<image\s+(\d+)\s*>", re.IGNORECASE)
_WORD = re.compile(r"\b([a-z']+)\b")
# The authors' yes/no reading: the first of these words in the reply decides.
YES_WORDS = frozenset({"yes", "true", "correct", "right", "is", "are", "does", "can"})
NO_WORDS = frozenset({"no", "not", "false", "incorrect", "wrong", "cannot", "isn't", "aren't", "doesn't", "don't"})


@dataclass(frozen=True)
class Protocol:
    name: str                        # grace | llava
    choice_tokens: int = 8
    open_tokens: int = 32
    exact_tokens: int = 24           # the shapes task and conversation files: short descriptive answers

    def max_new_tokens(self, item: EvalItem) -> int:
        if item.kind == "exact":
            return self.exact_tokens
        return self.open_tokens if item.kind == "open" else self.choice_tokens


PROTOCOLS = {"grace": Protocol("grace"), "llava": Protocol("llava", choice_tokens=128, open_tokens=128)}


def get_protocol(protocol: str | Protocol) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}': choose {' or '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol]


def question_text(item: EvalItem) -> str:
    """The question as the model reads it: MMMU's "<image 2>" references become plain "<image>" markers."""
    question = item.question.strip()
    return _IMAGE_TAG.sub("<image>", question) if item.bench == "mmmu" else question


def build_prompt(item: EvalItem, protocol: str | Protocol = "grace") -> str:
    protocol = get_protocol(protocol)
    question = question_text(item)
    if item.kind == "exact":
        return item.question
    llava = protocol.name == "llava"
    if item.kind == "yesno":
        return f"{question}\n{LLAVA_SHORT if llava else ANSWER_YES_NO}"
    if item.kind == "open":
        return f"{question}\n{LLAVA_SHORT if llava else ANSWER_SHORT}"
    hint = (item.hint or "").strip()
    if llava:
        lines = ([hint] if hint else []) + [question] + [f"{letter}. {option}" for letter, option in item.options or []]
        return "\n".join(lines + [LLAVA_LETTER])
    if not item.options:   # MMStar rows whose options live inside the question text
        return f"{question}\n\n{ANSWER_LETTER_ABCD}"
    lines = ([f"Context: {hint}"] if hint else []) + [f"Question: {question}", "Options:"]
    lines += [f"({letter}) {option}" for letter, option in item.options]
    return "\n".join(lines + [ANSWER_LETTER])


# -- reading replies ----------------------------------------------------------------------------------

def first_letter(reply: str, letters: str) -> str:
    """The authors' rule: the first character of the upper-cased reply that is a valid option letter ("" if none).
    Note "Answer: C" reads as A when A is an option: the rule looks at every character, as the release did."""
    return next((ch for ch in reply.strip().upper() if ch in letters), "")


def last_letter(reply: str, letters: str) -> str:
    """MMStar's rule: the last standalone valid letter of the upper-cased reply, else the last valid character."""
    text = reply.strip().upper()
    if not letters:
        return ""
    standalone = re.findall(rf"\b([{re.escape(letters)}])\b", text)
    if standalone:
        return standalone[-1]
    return next((ch for ch in reversed(text) if ch in letters), "")


def leading_letter(reply: str, letters: str) -> str:
    """LLaVA's reading: "B", "(B)", "B. text", or "The answer is B"."""
    text = reply.strip()
    if not letters:
        return ""
    match = re.match(rf"^\(?([{re.escape(letters)}])(?:[\).:\s]|$)", text)
    if match is None:
        match = re.search(rf"answer is \(?([{re.escape(letters)}])\b", text)
    return match.group(1) if match else ""


def yes_no(reply: str) -> str:
    """The authors' HallusionBench reading: "1" (yes) or "0" (no) from the first yes- or no-word, "" if none."""
    for match in _WORD.finditer(reply.strip().lower()):
        word = match.group(1)
        if word in YES_WORDS:
            return "1"
        if word in NO_WORDS:
            return "0"
    return ""


def llava_yes_no(reply: str) -> str:
    """LLaVA's POPE reading: "no" or "not" among the words of the first sentence means no, anything else yes."""
    words = reply.strip().split(".")[0].replace(",", "").lower().split()
    return "0" if ("no" in words or "not" in words) else ("1" if words else "")


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().translate(_PUNCT).split())


def _number(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", "").rstrip("."))
    except ValueError:
        return None


def open_match(reply: str, gold: str) -> bool:
    """MMMU open questions, the authors' rule: a numeric gold matches the first number in the reply (within 1e-4);
    otherwise the normalised gold equals the normalised reply or is one of its words."""
    reply, gold = reply.strip(), gold.strip()
    if not reply or not gold:
        return False
    target = _number(gold)
    if target is not None:
        found = re.search(r"-?\d+(?:\.\d+)?", reply)
        value = _number(found.group(0)) if found else None
        if value is not None and abs(value - target) < 1e-4:
            return True
    gold_norm, reply_norm = normalize(gold), normalize(reply)
    return bool(gold_norm) and (gold_norm == reply_norm or gold_norm in reply_norm.split())


def extract(item: EvalItem, reply: str, protocol: str | Protocol = "grace") -> str:
    """What the reply answered, in the gold's terms: a letter, "1"/"0", or the stripped text."""
    llava = get_protocol(protocol).name == "llava"
    if item.kind == "choice":
        if llava:
            return leading_letter(reply, item.letters)
        return (last_letter if item.pick == "last" else first_letter)(reply, item.letters)
    if item.kind == "yesno":
        return llava_yes_no(reply) if llava else yes_no(reply)
    return reply.strip()


def is_correct(item: EvalItem, reply: str, protocol: str | Protocol = "grace") -> bool:
    if item.error:
        return False
    pred = extract(item, reply, protocol)
    if item.kind == "open":
        return open_match(pred, item.answer)
    if item.kind == "exact":
        return normalize(pred) == normalize(item.answer)
    return pred != "" and pred == item.answer.strip().upper()
