"""Cross-tokenizer alignment: one response text, two tokenizations, cut into the spans both share.

The student samples a response (its own token ids); a teacher with another tokenizer scores the same text,
re-tokenised with its own tokenizer. Token i of one side rarely corresponds to token i of the other, but
both tokenizations pass through the same character positions at many places. The spans between consecutive
shared positions are the units on which the two models' log-probabilities can be compared: by the chain
rule, the sum of a side's token log-probs over a span is that model's log-probability of the span's text
given everything before it. The idea is the sequence alignment of ULD (Boizard et al., "Towards
Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030) and of
TRL's GOLD trainer, which merge tokens until both sides reach a common boundary; the code here is our own.

Positions are characters of the decoded text (Python str indices). A byte-level BPE may end a token inside
a multi-byte character (an emoji, a CJK character); such a token is given the character interval that
contains its bytes, so it overlaps the next token by one character, and the position after it is not a
possible cut (see `token_char_spans`, `boundary_ends`).

Public: `token_char_spans`, `boundary_ends`, `align_spans`, `reencode`, `end_of_turn_id`, `cross_tokenize` (-> `Alignment`),
`alignment_stats`, `same_vocabulary`. The span-level estimators are in `objectives/spans.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import OpdistillError

CharSpan = tuple[int, int]  # [start, end) in characters of the decoded text
Span = tuple[int, int, int, int]  # student tokens [start, end), teacher tokens [start, end)

CONTEXT_CUTS = 2  # clean cuts decoded before a window in `decode_spans`, for decoders whose output depends on the left context
METHODS = ("auto", "offsets", "decode")


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens kept and no clean-up of spaces (a lossless rendering where the tokenizer allows)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix(a: str, b: str, b_start: int = 0) -> int:
    """The length of the longest common prefix of `a` and b[b_start:] (without copying b)."""
    n = min(len(a), len(b) - b_start)
    for k in range(n):
        if a[k] != b[b_start + k]:
            return k
    return n


# ------------------------------------------------------------------ character spans of one tokenization

def _tiles(spans: list[CharSpan], text: str) -> bool:
    """The spans tile `text` in order: from 0 to its end, each token starting where the previous one ended, or one
    (non-ASCII) character earlier when the previous one ended inside that character."""
    if not spans:
        return not text
    if spans[0][0] != 0 or spans[-1][1] != len(text):
        return False
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
        overlaps_char = next_start == end - 1 and end > 0 and ord(text[end - 1]) > 127
        if start > end or next_end < end or not (next_start == end or overlaps_char):
            return False
    return True


def offset_spans(tokenizer: Any, ids: Sequence[int], text: str) -> list[CharSpan] | None:
    """Spans from the offsets of re-encoding `text`, or None when the tokenizer has no offsets, the re-encoding is
    not exactly `ids` (a sampled, non-canonical tokenization) or the offsets do not tile the text."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return None  # a slow (Python) tokenizer has no offsets
    if list(encoded["input_ids"]) != list(ids):
        return None
    spans = [(int(start), int(end)) for start, end in encoded["offset_mapping"]]
    return spans if _tiles(spans, text) else None


def _reach(tokenizer: Any, ids: Sequence[int], text: str, last: int, context: tuple[int, int],
           anchor: tuple[int, int]) -> tuple[int, bool]:
    """How far the decoding of ids[: last + 1] agrees with `text` (characters), and whether it agrees entirely.

    `context` and `anchor` are (tokens, characters) with ids[:tokens] decoding to text[:characters], context <= anchor.
    The window from the context is decoded, and the context's own part (up to the anchor) removed: starting a few
    clean cuts back keeps decoders whose output depends on the left context (SentencePiece drops the leading space
    of a first token) exact. Where that part is not a prefix of the window's decoding, the whole prefix is decoded."""
    before = decode_text(tokenizer, ids[context[0]:anchor[0]])
    window = decode_text(tokenizer, ids[context[0]:last + 1])
    if window.startswith(before):
        tail, offset = window[len(before):], anchor[1]
    else:
        tail, offset = decode_text(tokenizer, ids[:last + 1]), 0
    agree = _common_prefix(tail, text, offset)
    return offset + agree, agree == len(tail)


def decode_spans(tokenizer: Any, ids: Sequence[int], text: str) -> list[CharSpan]:
    """Spans from decoding growing prefixes: a token whose prefix decodes to exactly text[:c] ends at c; one whose
    prefix decoding stops agreeing at character c (a partial character decodes to U+FFFD) ends inside character c
    and is given [.., c + 1). Windows start CONTEXT_CUTS clean cuts back, so the cost is linear in len(ids). A text
    that itself holds U+FFFD (a sampled invalid byte sequence) is compared as the text it decodes to."""
    spans: list[CharSpan] = []
    start = 0
    anchors = [(0, 0)]  # (tokens, characters) at the clean cuts so far
    for last in range(len(ids)):
        reach, clean = _reach(tokenizer, ids, text, last, anchors[max(0, len(anchors) - 1 - CONTEXT_CUTS)], anchors[-1])
        reach = max(reach, start)
        end = reach if clean else min(reach + 1, len(text))
        if last == len(ids) - 1:
            end = len(text)
        spans.append((start, max(end, start)))
        start = reach
        if clean:
            anchors.append((last + 1, reach))
    return spans


def token_char_spans(tokenizer: Any, ids: Sequence[int], method: str = "auto") -> list[CharSpan]:
    """The character interval [start, end) of each token of `ids` in `decode_text(tokenizer, ids)`.

    A token that ends inside a multi-byte character gets the interval up to the end of that character, and the
    next token starts at that character (the two overlap by one), as Hugging Face offset mappings do.

    method "offsets": the offsets of re-encoding the decoded text (fast tokenizers); used by "auto" when the
    re-encoding reproduces `ids` exactly and its offsets tile the text. method "decode": incremental decoding of
    prefixes (`decode_spans`), which any tokenizer and any (also non-canonical, sampled) tokenization allows;
    "auto" falls back to it otherwise. Both give the same intervals where both apply (tests/test_spans.py).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    text = decode_text(tokenizer, ids)
    if method != "decode":
        spans = offset_spans(tokenizer, ids, text)
        if spans is not None:
            return spans
        if method == "offsets":
            raise ValueError("the tokenizer's offsets cannot place these ids: no offsets, or its re-encoding differs from them")
    return decode_spans(tokenizer, ids, text)


def boundary_ends(spans: Sequence[CharSpan]) -> list[int]:
    """For each token, the first position at or after its end where the text may be cut: its own end when the next
    token starts there, else (it ends inside a character) the next token's cut. Non-decreasing; input to align_spans."""
    ends = [0] * len(spans)
    for i in range(len(spans) - 1, -1, -1):
        last = i == len(spans) - 1
        ends[i] = spans[i][1] if last or spans[i + 1][0] >= spans[i][1] else ends[i + 1]
    return ends


# ------------------------------------------------------------------ aligning two tokenizations

def _cuts(ends: Sequence[int]) -> list[tuple[int, int]]:
    """(position, tokens before it) after the last token of each run of equal ends; [(0, 0)] for no tokens."""
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError("character ends must be non-decreasing (pass boundary_ends(token_char_spans(...)))")
    if not ends:
        return [(0, 0)]
    return [(end, i + 1) for i, end in enumerate(ends) if i + 1 == len(ends) or ends[i + 1] > end]


def align_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[Span]:
    """The spans between the cut positions both tokenizations share, by a two-pointer merge of their cuts.

    `*_ends[i]`: the first character position at or after token i where that side may be cut (`boundary_ends`); a
    cut falls after the last token of each run of equal ends. Each span is (student_start, student_end,
    teacher_start, teacher_end), token indices [start, end); the spans are consecutive and cover both sequences.
    Both sides must end at the same character (the same text); two empty sides give no span.
    """
    if not student_ends and not teacher_ends:
        return []
    student, teacher = _cuts(student_ends), _cuts(teacher_ends)
    if student[-1][0] != teacher[-1][0]:
        raise ValueError(f"the two tokenizations cover different texts: {student[-1][0]} and {teacher[-1][0]} characters")
    spans: list[Span] = []
    i = j = s_prev = t_prev = 0
    while i < len(student) and j < len(teacher):
        (s_pos, s_tokens), (t_pos, t_tokens) = student[i], teacher[j]
        if s_pos == t_pos:
            spans.append((s_prev, s_tokens, t_prev, t_tokens))
            s_prev, t_prev, i, j = s_tokens, t_tokens, i + 1, j + 1
        elif s_pos < t_pos:
            i += 1
        else:
            j += 1
    return spans


def special_ids(tokenizer: Any) -> dict[int, str]:
    """The tokenizer's control tokens, id -> content: its named special tokens and every added token marked special."""
    named = {int(i): tokenizer.convert_ids_to_tokens(int(i)) for i in tokenizer.all_special_ids}
    return {**named, **{int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}}


def reencode(student_tok: Any, teacher_tok: Any, body: Sequence[int]) -> list[int]:
    """The teacher's token ids for the student's response tokens `body` (no end token).

    Text is encoded as text with special tokens split: a student that *writes* the characters "<|im_start|>" wrote
    characters, and the teacher must score them as such, not as its control token (which would also let a sample
    steer the teacher's chat structure). Only a control token the student actually sampled becomes the teacher's
    control token of the same content, where it has one; else its text is encoded like any other."""
    student_special, teacher_special = special_ids(student_tok), {content: i for i, content in special_ids(teacher_tok).items()}
    ids: list[int] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            ids.extend(teacher_tok(decode_text(student_tok, run), add_special_tokens=False, split_special_tokens=True)["input_ids"])
            run.clear()

    for token in body:
        content = student_special.get(token)
        if content is not None and content in teacher_special:
            flush()
            ids.append(teacher_special[content])
        else:
            run.append(token)
    flush()
    return ids


def end_of_turn_id(tokenizer: Any) -> int:
    """The token the tokenizer's chat template writes right after an assistant turn's text (<|im_end|>, <|eot_id|>,
    <end_of_turn>, ...): what a model of that template predicts where a response ends. It differs from
    `eos_token_id` in some tokenizers (a base model's <|endoftext|> kept beside an instruct template); that EOS is
    the fallback for a template that writes no control token after the turn."""
    marker = "\u2063opdistill-end\u2063"  # invisible separators: text no template writes by itself
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                                 tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a turn raises any of several types
        rendered = ""
    after = rendered.partition(marker)[2] if isinstance(rendered, str) else ""
    controls = special_ids(tokenizer)
    for token in tokenizer(after, add_special_tokens=False)["input_ids"] if after else []:
        if token in controls:
            return int(token)
        if decode_text(tokenizer, [token]).strip():
            break  # visible text before any control token: the template ends turns with text, not a token
    return tokenizer.eos_token_id


def same_vocabulary(a: Any, b: Any) -> bool:
    """Two tokenizers with one token -> id table (then equal ids mean equal bytes, token by token)."""
    return a is b or a.get_vocab() == b.get_vocab()


@dataclass(frozen=True)
class Alignment:
    """One student response aligned with the teacher's tokenization of its text.

    `student_ids`: the response as sampled (its end token last when `finished`). `teacher_ids`: the text re-tokenised
    by the teacher (`add_special_tokens=False`), then the teacher's end token when `finished`. `spans`: consecutive
    (student_start, student_end, teacher_start, teacher_end) covering both. `char_ends`: each span's end in `text`.
    `student_cuts`: positions in the text where the student's tokenization may be cut (for `alignment_stats`).
    """

    text: str
    student_ids: list[int]
    teacher_ids: list[int]
    spans: list[Span]
    char_ends: list[int]
    student_cuts: int
    finished: bool
    aligned: bool = True  # False: a placeholder for a sample the teacher cannot give back (`unaligned`); it trains on nothing


def unaligned(student_response_ids: Sequence[int], teacher_tok: Any, finished: bool) -> Alignment:
    """A placeholder for one sampled response whose text the teacher's tokenizer does not reproduce (e.g. a control
    character it drops): one span over all of it against the teacher's end token, so the batch keeps its shape; the
    caller gives its tokens no loss. A pair that fails on ordinary text is refused by `opdistill check` instead."""
    ids = list(student_response_ids)
    return Alignment("", ids, [teacher_tok.eos_token_id], [(0, len(ids), 0, 1)], [0], 0, finished, aligned=False)


def _check_same_text(text: str, teacher_text: str) -> None:
    if teacher_text == text:
        return
    at = _common_prefix(text, teacher_text)
    raise OpdistillError(
        f"the student's and the teacher's tokenizers cannot be aligned: the student's response {text[max(0, at - 20):at + 20]!r} "
        f"comes back from the teacher's tokenizer as {teacher_text[max(0, at - 20):at + 20]!r} (first difference at character "
        f"{at}); its normaliser changes the text (lower-casing, accent stripping, unknown characters), so no span of one maps "
        "onto a span of the other",
        "use a teacher whose tokenizer reproduces any text exactly (a byte-level BPE, e.g. Qwen2.5's or Llama-3's), or "
        "black-box distillation from the teacher's text: method: gad")


def cross_tokenize(student_tok: Any, teacher_tok: Any, student_response_ids: Sequence[int], finished: bool,
                   teacher_end_id: int | None = None, shared_vocab: bool | None = None) -> Alignment:
    """Align a student response with the teacher's tokenization of the same text.

    The text is the student's decoding of its response without its end token; the teacher re-tokenises it (`reencode`:
    text as text, only sampled control tokens mapped) and must decode it back to the same text, else OpdistillError.
    When `finished`, the response's last token (the student's EOS) is its own final span against `teacher_end_id`
    (callers pass `end_of_turn_id(teacher_tok)`; default its eos_token_id); a response cut by the horizon has no end
    token and no end span.

    When both tokenizers share one vocabulary (`shared_vocab`, computed when None; pass it to skip the comparison
    per call), the teacher scores the student's own ids, every token its own span: re-tokenising would not give back
    a sample that is not the tokenizer's canonical split, or that holds the bytes of an unfinished character.
    (Between two vocabularies such bytes decode to U+FFFD on both sides: the teacher then scores that character.)
    """
    ids = list(student_response_ids)
    if finished and not ids:
        raise ValueError("a finished response holds at least its end token")
    if shared_vocab is None:
        shared_vocab = same_vocabulary(student_tok, teacher_tok)
    if shared_vocab:
        # One vocabulary: the teacher scores the student's very tokens, end token included, one span each. Re-tokenising
        # would not give them back when the sample is not the tokenizer's canonical split, or holds bytes of a character
        # it never finished (they decode to U+FFFD, which re-encodes as other bytes).
        return Alignment(decode_text(student_tok, ids), ids, ids, [(i, i + 1, i, i + 1) for i in range(len(ids))],
                         [span[1] for span in token_char_spans(student_tok, ids)], len(ids) - finished, finished)
    body = ids[:-1] if finished else ids
    text = decode_text(student_tok, body)
    teacher_body = reencode(student_tok, teacher_tok, body)
    _check_same_text(text, decode_text(teacher_tok, teacher_body))
    student_ends = boundary_ends(token_char_spans(student_tok, body))
    spans = align_spans(student_ends, boundary_ends(token_char_spans(teacher_tok, teacher_body)))
    char_ends = [student_ends[span[1] - 1] if span[1] else 0 for span in spans]
    cuts = len(set(student_ends))
    teacher_ids = teacher_body
    if finished:
        end_id = teacher_tok.eos_token_id if teacher_end_id is None else teacher_end_id
        if end_id is None:
            raise OpdistillError("the teacher's tokenizer has no eos_token_id to stand for the student's end token",
                                 "pass teacher_end_id (its end-of-turn token, e.g. <|im_end|> or <|eot_id|>)")
        spans.append((len(body), len(ids), len(teacher_body), len(teacher_body) + 1))
        char_ends.append(len(text))
        teacher_ids = teacher_body + [end_id]
    return Alignment(text, ids, teacher_ids, spans, char_ends, cuts, finished)


def alignment_stats(alignments: Sequence[Alignment]) -> dict[str, float]:
    """Summary of a batch of alignments (end-of-response spans left out of the first three):

    - `shared_boundaries`: the share of the student's cut positions that are also the teacher's (1.0: every
      student token boundary is a span boundary; with tokens that end inside a character, those are no cut);
    - `one_to_one_chars`: the share of the text's characters in spans of one token on each side;
    - `mean_student_tokens`, `mean_teacher_tokens`: tokens per span on each side;
    - `spans`: spans in all (end spans included), `end_spans`: the finished responses' end spans.
    """
    body = [(a, span, a.char_ends[k] - (a.char_ends[k - 1] if k else 0))
            for a in alignments for k, span in enumerate(a.spans[: len(a.spans) - a.finished])]
    cuts = sum(a.student_cuts for a in alignments)
    chars = sum(width for _, _, width in body)
    one_to_one = sum(width for _, span, width in body if span[1] - span[0] == 1 and span[3] - span[2] == 1)
    n = len(body)
    return {
        "shared_boundaries": n / cuts if cuts else 1.0,
        "one_to_one_chars": one_to_one / chars if chars else 1.0,
        "mean_student_tokens": sum(s[1] - s[0] for _, s, _ in body) / n if n else 0.0,
        "mean_teacher_tokens": sum(s[3] - s[2] for _, s, _ in body) / n if n else 0.0,
        "spans": float(sum(len(a.spans) for a in alignments)),
        "end_spans": float(sum(a.finished for a in alignments)),
    }
