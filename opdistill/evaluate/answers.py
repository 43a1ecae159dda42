"""Final-answer extraction and exact-match checks for GSM8K and MATH-500 (pure string functions).

The prompt states one answer format (`GSM8K_INSTRUCTION`, `MATH_INSTRUCTION`); the extractor is tolerant of the
others a model may use instead, in this order of trust: `\\boxed{...}` (the last one), `#### X`, "the answer is X",
and, last, the final number in the response.

GSM8K answers are numbers: compared as exact decimals after removing `$`, thousands separators, a trailing period
and trailing zeros after the point (`18.00` = `18`).

MATH answers are LaTeX. `normalize_math` removes what does not change the value: `\\left`/`\\right`, spacing
commands, `\\dfrac`/`\\tfrac`, `\\text{}` wrappers, degree signs, `\\%`, dollar signs, a leading `x =`, spaces,
and braces omitted in `\\frac12` / `\\sqrt2`. Two answers match when the normalised strings are equal or both are
plain numbers (integers, decimals, `a/b`, `\\frac{a}{b}`, with a sign) of equal value. What this does NOT check:
symbolic equivalence (`\\sqrt{8}` vs `2\\sqrt{2}`, `\\frac{\\sqrt3}{2}` vs `\\frac{1}{2}\\sqrt3`, reordered sums or
factors), tuples or sets in another order, intervals written differently, units spelled out (`5 cm` vs `5`), and
answers in words. Such an answer counts as wrong, so MATH accuracy here is a lower bound.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

GSM8K_INSTRUCTION = "Solve the problem step by step. End with a final line of the form \"#### <number>\" that gives only the final answer."
MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."

NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")
HASHES = re.compile(r"####\s*([^\n]+)")
ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)


# ---------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0:
        tail = text[start:].split(None, 1)  # "\boxed 5": the argument without braces
        return tail[1].split()[0].rstrip(".$") if len(tail) > 1 else None
    depth = 0
    for position in range(opening, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[opening + 1:position]
    return None  # unbalanced: the answer was cut off


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1] if found else None


def stated_answer(text: str) -> str | None:
    """What the response states as its final answer, before any normalisation."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (HASHES, ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            return matches[-1].strip()
    return None


# ---------------------------------------------------------------- GSM8K


def clean_number(text: str) -> Decimal | None:
    """A number written with `$`, thousands commas, a trailing period or trailing zeros, as an exact decimal."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def gsm8k_gold(solution: str) -> Decimal:
    """The reference answer after `####` in a GSM8K worked solution."""
    match = HASHES.search(solution)
    value = clean_number(match[1]) if match else None
    if value is None:
        raise ValueError(f"no '#### <number>' final answer in the GSM8K solution: {solution[-80:]!r}")
    return value


def gsm8k_extract(response: str) -> Decimal | None:
    """The response's final number: the first number of its stated answer ("The answer is 18 (checked 3 times)"),
    else its last number."""
    stated = stated_answer(response)
    numbers = NUMBER.findall(stated) if stated is not None else []
    candidate = numbers[0] if numbers else None
    if candidate is None:
        candidate = last_number(response)
    return clean_number(candidate) if candidate is not None else None


def gsm8k_correct(response: str, solution: str) -> tuple[bool, str | None]:
    """(correct, the extracted answer as text)."""
    found = gsm8k_extract(response)
    return found is not None and found == gsm8k_gold(solution), None if found is None else format(found.normalize(), "f")


# ---------------------------------------------------------------- MATH


def unwrap_command(text: str, command: str) -> str:
    """`\\text{abc}` -> `abc` for every occurrence of the command (balanced braces)."""
    marker = "\\" + command + "{"
    while marker in text:
        start = text.index(marker)
        depth, end = 0, None
        for position in range(start + len(marker) - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                end = position
                break
        if end is None:
            return text.replace(marker, "", 1)
        text = text[:start] + text[start + len(marker):end] + text[end + 1:]
    return text


def normalize_math(answer: str) -> str:
    text = answer.strip()
    for command in ("boxed", "text", "textbf", "mathrm", "mbox"):
        text = unwrap_command(text, command)
    for removed in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "^{\\circ}", "^\\circ", "\\circ",
                    "°", "\\%", "%", "\\$", "$"):
        text = text.replace(removed, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)  # \frac12
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)  # \frac{1}2
    text = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", text)  # \sqrt2
    text = re.sub(r"\s+", "", text)
    text = re.sub(r"^[a-zA-Z]=(?!=)", "", text)  # "x=5" -> "5"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):  # 1,000 is a number; 1,-2 is a pair
        text = text.replace(",", "")
    text = text.rstrip(".")
    if text.startswith("."):
        text = "0" + text
    return text.lower()


def math_number(text: str) -> Fraction | None:
    """The value of a normalised answer that is a plain number: integer, decimal, a/b or \\frac{a}{b}."""
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", text) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", text)
    try:
        if match:
            value = Fraction(int(match[2]), int(match[3]))
            return -value if match[1] else value
        return Fraction(Decimal(text)) if re.fullmatch(r"-?\d+(\.\d+)?", text) else None
    except (ZeroDivisionError, InvalidOperation, ValueError):
        return None


def math_equal(found: str, gold: str) -> bool:
    a, b = normalize_math(found), normalize_math(gold)
    if a == b:
        return True
    x, y = math_number(a), math_number(b)
    return x is not None and x == y


def math_extract(response: str) -> str | None:
    stated = stated_answer(response)
    if stated is not None:
        return stated.strip().rstrip(".").strip("$ ")
    return last_number(response)


def math_correct(response: str, gold: str) -> tuple[bool, str | None]:
    found = math_extract(response)
    return found is not None and math_equal(found, gold), found
