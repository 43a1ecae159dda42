"""Cross-tokenizer spans: tokenizer-level alignment (teachers/alignment.py) and span estimators (objectives/spans.py).

Invariants checked against independent references: a span boundary is a place where both sides' prefix decodings
agree (decoded here prefix by prefix, O(n²)); span sums match a Python loop; with one tokenizer on both sides every
span is one token and the span estimators equal the per-token ones exactly (float64, torch.equal). What each estimator's
expected gradient is, is checked by exact expectation in tests/test_estimators.py."""

from __future__ import annotations

import json

import pytest
import torch

from opdistill.data import builtin_prompts_path
from opdistill.errors import OpdistillError
from opdistill.models import load_tokenizer
from opdistill.objectives.spans import (ESTIMATORS, rewards_to_go, sampled_kl_losses, span_index, span_rewards, span_sums,
                                        token_spans)
from opdistill.teachers.alignment import (align_spans, alignment_stats, boundary_ends, cross_tokenize, decode_text,
                                          token_char_spans)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo  wörld, ça va? Ünïcödé àccents: naïve café, Ångström.",
    "Emoji 😀👍🏽 and a family 👨‍👩‍👧 then 🎉🎉🎉!",
    "中文字符测试，日本語のテキスト、한국어 텍스트。",
    "  leading spaces, \t\ttabs,\n\n\nnewlines   and    runs      of spaces  \n",
    "def f(x):\n    return x ** 2  # code\n",
]


def _corpus() -> list[str]:
    return [json.loads(line)["prompt"] for line in builtin_prompts_path().read_text().splitlines()] + TEXTS


def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Llama-2-style BPE: '▁' for spaces, a prepended '▁' stripped again on decode, byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=special, show_progress=False))
    return _wrap(tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def lowercasing():
    """A WordPiece tokenizer that lower-cases and strips accents: it cannot give back the student's text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]", "[SEP]"], show_progress=False))
    return _wrap(tok, eos_token="[SEP]", unk_token="[UNK]")


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _check_alignment(student, teacher, ids: list[int], finished: bool):
    a = cross_tokenize(student, teacher, ids + [student.eos_token_id] if finished else ids, finished)
    assert a.spans, "a non-empty response has spans"
    s_at = t_at = 0
    for s0, s1, t0, t1 in a.spans:  # consecutive, each side non-empty, covering both sequences
        assert (s0, t0) == (s_at, t_at) and s1 > s0 and t1 > t0
        s_at, t_at = s1, t1
    assert (s_at, t_at) == (len(a.student_ids), len(a.teacher_ids))
    body = a.spans[:-1] if finished else a.spans
    s_body, t_body = a.student_ids[: len(a.student_ids) - finished], a.teacher_ids[: len(a.teacher_ids) - finished]
    assert decode_text(teacher, t_body) == decode_text(student, s_body) == a.text
    for (s0, s1, t0, t1), end in zip(body, a.char_ends):  # both sides' prefixes decode to the same text at every span end
        assert decode_text(student, s_body[:s1]) == decode_text(teacher, t_body[:t1]) == a.text[:end]
    if finished:
        assert a.spans[-1] == (len(s_body), len(s_body) + 1, len(t_body), len(t_body) + 1)
        assert a.teacher_ids[-1] == teacher.eos_token_id and a.student_ids[-1] == student.eos_token_id
    else:
        assert a.teacher_ids == t_body and a.char_ends[-1] == len(a.text)
    return a


# ------------------------------------------------------------------ span math


def test_span_sums_match_a_loop_and_are_differentiable():
    torch.manual_seed(0)
    values = torch.randn(50, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 12, (50,))  # some of the 13 spans stay empty
    sums = span_sums(values, ids, 13)
    expected = [sum(values[t].item() for t in range(50) if ids[t] == s) for s in range(13)]
    assert torch.allclose(sums, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert sums[12].item() == 0.0
    sums.sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))
    with pytest.raises(ValueError):
        span_sums(values, ids[:3], 13)


def test_span_index_numbers_spans_across_rows():
    index = span_index([[(0, 2, 0, 1), (2, 3, 1, 4)], [(0, 1, 0, 2)]])
    assert index.n_spans == 3 and index.spans_per_row == (2, 1)
    assert index.student_ids.tolist() == [0, 0, 1, 2] and index.teacher_ids.tolist() == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="consecutive"):
        span_index([[(0, 2, 0, 1), (3, 4, 1, 2)]])


def test_multi_token_spans_follow_the_chain_rule():
    """Two student tokens against three teacher tokens, then one against one: a span's reward is the difference of the
    span sums; every student token of a span gets its span's advantage (reward) or reward-to-go, rows kept apart."""
    ls = torch.tensor([-0.5, -1.25, -0.1, -2.0], dtype=torch.float64, requires_grad=True)
    lt = torch.tensor([-0.2, -0.3, -0.4, -0.05, -1.0], dtype=torch.float64)
    index = span_index([[(0, 2, 0, 3), (2, 3, 3, 4)], [(0, 1, 0, 1)]])
    r = span_rewards(ls, lt, index)
    assert torch.allclose(r, torch.tensor([-0.9 + 1.75, -0.05 + 0.1, -1.0 + 2.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(rewards_to_go(r, index.spans_per_row), torch.stack([r[0] + r[1], r[1], r[2]]), atol=1e-15)
    (grad,) = torch.autograd.grad(sampled_kl_losses("reward", ls, lt, index).sum(), ls)
    assert torch.allclose(grad, -torch.stack([r[0], r[0], r[1], r[2]]), atol=1e-15), "∂/∂ℓ_t = −(its span's reward)"
    (grad,) = torch.autograd.grad(sampled_kl_losses("reward_to_go", ls, lt, index).sum(), ls)
    assert torch.allclose(grad, -torch.stack([r[0] + r[1], r[0] + r[1], r[1], r[2]]), atol=1e-15), "no reward crosses rows"
    baseline = torch.tensor([0.25, -0.5], dtype=torch.float64)
    (grad,) = torch.autograd.grad(sampled_kl_losses("reward_to_go", ls, lt, index, baseline).sum(), ls)
    assert torch.allclose(grad, -torch.stack([r[0] + r[1] - 0.25, r[0] + r[1] - 0.25, r[1] - 0.25, r[2] + 0.5]), atol=1e-15)


def test_a_teacher_that_rules_a_token_out_gives_a_floored_reward():
    """vLLM's −inf (read as −inf by the client): the reward is floored, finite, and still the most negative."""
    from opdistill.objectives.spans import TEACHER_LOGPROB_FLOOR

    ls = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    lt = torch.tensor([float("-inf"), -9999.0], dtype=torch.float64)
    losses = sampled_kl_losses("reward_to_go", ls, lt, token_spans([2]))
    (grad,) = torch.autograd.grad(losses.sum(), ls)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    assert grad.tolist() == [-(TEACHER_LOGPROB_FLOOR + 1.0 + TEACHER_LOGPROB_FLOOR + 2.0), -(TEACHER_LOGPROB_FLOOR + 2.0)]


# ------------------------------------------------------------------ the same tokenizer on both sides


@pytest.mark.parametrize("name", ["smollm2", "tiny"])
def test_identical_tokenizers_give_one_token_spans_and_the_per_token_estimators(name, request):
    tok = request.getfixturevalue(name)
    rows = [_encode(tok, text) for text in TEXTS]
    alignments = [cross_tokenize(tok, tok, ids + [tok.eos_token_id], True) for ids in rows[:3]]
    alignments += [cross_tokenize(tok, tok, ids, False) for ids in rows[3:]]
    for a in alignments:
        assert all(s1 - s0 == 1 and t1 - t0 == 1 and s0 == t0 for s0, s1, t0, t1 in a.spans)
        assert a.teacher_ids == a.student_ids
    stats = alignment_stats(alignments)
    assert stats["shared_boundaries"] == stats["one_to_one_chars"] == stats["mean_student_tokens"] == stats["mean_teacher_tokens"] == 1.0
    assert stats["end_spans"] == 3
    index = span_index([a.spans for a in alignments])
    tokens = sum(len(a.student_ids) for a in alignments)
    assert index.n_spans == tokens
    per_token = token_spans([len(a.student_ids) for a in alignments])
    torch.manual_seed(1)
    for kind in ESTIMATORS:
        ls = (-torch.rand(tokens, dtype=torch.float64) * 6).requires_grad_()
        lt = -torch.rand(tokens, dtype=torch.float64) * 20
        span_loss = sampled_kl_losses(kind, ls, lt, index)
        token_loss = sampled_kl_losses(kind, ls, lt, per_token)
        assert torch.equal(span_loss, token_loss), kind
        assert torch.equal(torch.autograd.grad(span_loss.sum(), ls)[0], torch.autograd.grad(token_loss.sum(), ls)[0]), kind


def test_identical_tokenizers_align_token_by_token_without_the_shortcut(smollm2):
    """The general merge (not the equal-ids shortcut) also finds every boundary when no token ends inside a character."""
    for text in (TEXTS[0], TEXTS[4], TEXTS[5]):
        ends = boundary_ends(token_char_spans(smollm2, _encode(smollm2, text)))
        assert align_spans(ends, ends) == [(i, i + 1, i, i + 1) for i in range(len(ends))]


# ------------------------------------------------------------------ two tokenizers


@pytest.mark.parametrize("pair", [("smollm2", "tiny"), ("tiny", "smollm2"), ("smollm2", "sentencepiece_like"),
                                  ("sentencepiece_like", "tiny")])
@pytest.mark.parametrize("finished", [True, False])
def test_cross_tokenizer_spans_cover_both_sides_with_equal_texts(pair, finished, request):
    student, teacher = (request.getfixturevalue(name) for name in pair)
    alignments = [_check_alignment(student, teacher, _encode(student, text), finished) for text in TEXTS]
    stats = alignment_stats(alignments)
    assert 0 < stats["shared_boundaries"] <= 1 and 0 <= stats["one_to_one_chars"] < 1
    assert stats["mean_student_tokens"] >= 1 and stats["mean_teacher_tokens"] >= 1
    assert stats["end_spans"] == (len(TEXTS) if finished else 0)


def test_a_sampled_non_canonical_tokenization_is_aligned_by_decoding(smollm2, tiny):
    """A student may sample a tokenization its tokenizer would never produce (here: one token per byte-level piece of
    each character); offsets cannot place it, incremental decoding can."""
    text = TEXTS[1] + " " + TEXTS[2]
    ids = [i for char in text for i in _encode(smollm2, char)]
    assert ids != _encode(smollm2, text)
    with pytest.raises(ValueError):
        token_char_spans(smollm2, ids, method="offsets")
    a = _check_alignment(smollm2, tiny, ids, finished=True)
    assert a.teacher_ids[:-1] == _encode(tiny, text)


@pytest.mark.parametrize("name", ["smollm2", "tiny", "sentencepiece_like"])
def test_char_spans_by_decoding_match_offsets_and_full_prefix_decoding(name, request):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = _encode(tok, text)
        decoded = token_char_spans(tok, ids, method="decode")
        reference = []  # O(n²): decode every whole prefix
        for i in range(len(ids)):
            prefix = decode_text(tok, ids[: i + 1])
            agree = next((k for k, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
            reference.append(agree if agree == len(prefix) else agree + 1)
        assert [end for _, end in decoded[:-1]] == reference[:-1] and decoded[-1][1] == len(text)
        if name != "sentencepiece_like":  # byte-level: re-encoding reproduces the ids, and the offsets tile the text
            assert token_char_spans(tok, ids, method="offsets") == decoded


def test_boundaries_inside_a_character_are_no_cuts():
    # tokens: "a", "b" + first byte of "é", rest of "é", "c"  ->  character spans (0,1) (1,3) (2,3) (3,4)
    ends = boundary_ends([(0, 1), (1, 3), (2, 3), (3, 4)])
    assert ends == [1, 3, 3, 4]
    assert align_spans(ends, [1, 2, 3, 4]) == [(0, 1, 0, 1), (1, 3, 1, 3), (3, 4, 3, 4)]  # teacher: "a" "b" "é" "c"
    assert align_spans(ends, [1, 3, 4]) == [(0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3)]  # teacher: "a" "bé" "c"
    assert align_spans(ends, [2, 4]) == [(0, 4, 0, 2)]  # teacher: "ab" "éc": no common cut before the end
    assert align_spans([], []) == []
    with pytest.raises(ValueError, match="different texts"):
        align_spans([1, 2], [1, 3])
    with pytest.raises(ValueError, match="non-decreasing"):
        align_spans([2, 1], [2])


def test_a_normalising_tokenizer_cannot_be_aligned(smollm2, lowercasing):
    ids = _encode(smollm2, "Héllo World")
    with pytest.raises(OpdistillError, match="cannot be aligned") as err:
        cross_tokenize(smollm2, lowercasing, ids, finished=False)
    assert "method: gad" in err.value.fix and "byte-level" in err.value.fix
