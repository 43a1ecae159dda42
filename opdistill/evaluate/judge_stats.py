"""Measured judge verdicts: a length-controlled win rate (pure numpy, float64), pairwise
verdicts as probabilities, and reading a local judge's verdict token (the model side of judge.LocalJudge's logit
verdicts; torch is imported only there).

Length-controlled win rate (after AlpacaEval 2.0's "length_controlled_minimal" GLM; Dubois et al. 2024,
arXiv 2404.04475). A judge that likes long answers rewards a model for talking more. The model

    logit E[outcome_i] = b0 + b1 · tanh(d_i / sd(d)),    d_i = len(x_i) − len(y_i)  (characters)

is fitted to the per-prompt outcomes (1 win, ½ tie, 0 loss, or an order-averaged probability). Outcomes in
[0, 1] are fitted by quasi-binomial maximum likelihood (the logistic log-likelihood with fractional targets,
what AlpacaEval obtains by duplicating each row with weights p and 1 − p), by Newton's method. The length-
controlled win rate is the prediction with the length term set to zero, sigmoid(b0): the win rate the judge
would give if the two answers were equally long. As in AlpacaEval, d is divided by its sample standard
deviation but not centred: centring would move a systematic length advantage into b0, the very term reported.

Limits. Without AlpacaEval's instruction-difficulty term and its regularisation towards length-gamed
baselines, this is the minimal form; it controls only what a tanh of the length difference can explain.
With few prompts (tens) b1 is poorly determined and the LC rate moves with it: the bootstrap interval says
how much. When every length difference is the same (or n < 2) length and model are confounded: b1 is not
identifiable, the ridge sets it to 0 and the LC rate equals the raw one. Outcomes that the length explains
perfectly (complete separation: a text judge that always picks the longer answer) would send b1 to infinity; a
ridge 0.1·b1²/2 on b1 (never on b0, so that with b1 = 0 the fit reproduces the raw mean exactly) keeps it finite.
Its price, measured on 40 prompts with X longer in about 3 of 4: outcomes exactly on the model with b1 = 2 are
fitted with b1 ≈ 1.9, and the LC rate keeps 1-2 points of the length effect (0.51-0.52 instead of 0.50, raw
0.68-0.77). Under separation the LC rate is not identified at all (b0 then depends on the ridge and on where the
step falls between the closest lengths): 0.85 raw became 0.72, 0.875 became 0.45, across seeds. Read it with its
bootstrap interval, and trust it only where the judge's preference is a graded function of length.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .stats import mcnemar_exact

VERDICT_PREFIX = "Verdict:"  # the forced start of a logit verdict's reply: PAIR_PROMPT asks for exactly this line
RIDGE = 0.1  # on b1 only; what it costs and buys at 40 prompts: see the module docstring (tests/test_judge.py)


def length_feature(length_x: np.ndarray, length_y: np.ndarray) -> np.ndarray:
    """tanh(d / sd(d)) with d = len_x − len_y and sd the sample standard deviation (ddof 1, as pandas' std that
    AlpacaEval uses); zeros when sd is 0 or undefined (the length effect cannot be told from the intercept)."""
    d = np.asarray(length_x, dtype=np.float64) - np.asarray(length_y, dtype=np.float64)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return np.tanh(d / sd) if sd > 0 else np.zeros_like(d)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + e^-z)


def _penalised_loglik(beta: np.ndarray, design: np.ndarray, y: np.ndarray, ridge: float) -> float:
    z = design @ beta
    # y·log σ(z) + (1−y)·log(1−σ(z)) = y·z − log(1 + e^z), with logaddexp for large |z|
    return float(np.sum(y * z - np.logaddexp(0.0, z)) - 0.5 * ridge * beta[1] ** 2)


def fit_logistic(feature: np.ndarray, outcomes: np.ndarray, ridge: float = RIDGE, max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[float, float]:
    """(b0, b1) maximising Σ y·log σ + (1−y)·log(1−σ) − ridge/2·b1² for σ = sigmoid(b0 + b1·feature), y in [0, 1].
    Newton's method with step halving (the objective is concave, so it converges from zero)."""
    y = np.asarray(outcomes, dtype=np.float64)
    design = np.column_stack([np.ones_like(y), np.asarray(feature, dtype=np.float64)])
    penalty = np.diag([0.0, ridge])
    beta = np.zeros(2)
    current = _penalised_loglik(beta, design, y, ridge)
    for _ in range(max_iter):
        p = _sigmoid(design @ beta)
        gradient = design.T @ (y - p) - penalty @ beta
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        # A tiny jitter keeps the solve defined when the feature is all zeros (b1 then stays at 0).
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        scale = 1.0
        while scale > 1e-8:
            candidate = beta + scale * step
            value = _penalised_loglik(candidate, design, y, ridge)
            if value >= current - 1e-12:
                break
            scale /= 2
        beta, improvement, current = candidate, value - current, value
        if abs(improvement) < tol and np.max(np.abs(scale * step)) < 1e-8:
            break
    return float(beta[0]), float(beta[1])


def _lc_rate(outcomes: np.ndarray, feature: np.ndarray, ridge: float) -> float:
    raw = float(outcomes.mean())
    if np.all(outcomes == outcomes[0]) and outcomes[0] in (0.0, 1.0):
        return raw  # all wins (or all losses): b0 is infinite, and no length can explain a difference that is not there
    b0, _ = fit_logistic(feature, outcomes, ridge)
    return float(_sigmoid(np.array(b0)))


def length_controlled_win_rate(outcomes: list[float], length_x: list[int], length_y: list[int], *,
                               ridge: float = RIDGE, bootstrap: int = 200, seed: int = 0) -> dict[str, float | int | None]:
    """Raw and length-controlled win rate of X over Y from per-prompt outcomes in [0, 1] and the answers' lengths
    (characters, as AlpacaEval: comparable across tokenizers). `lc_ci_low`/`lc_ci_high`: a percentile bootstrap
    over prompts (`bootstrap` resamples, seeded, so the numbers are reproducible); `length_coef` is b1 on the
    tanh scale (positive: the judge prefers the longer answer)."""
    y = np.asarray(outcomes, dtype=np.float64)
    n = int(y.size)
    if not n:
        return {"n": 0, "win_rate": None, "lc_win_rate": None, "length_coef": None, "lc_ci_low": None, "lc_ci_high": None}
    if len(length_x) != n or len(length_y) != n:
        raise ValueError(f"{n} outcomes but {len(length_x)} and {len(length_y)} lengths")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("outcomes must lie in [0, 1]")
    feature = length_feature(np.asarray(length_x), np.asarray(length_y))
    degenerate = np.all(y == y[0]) and y[0] in (0.0, 1.0)
    coef = 0.0 if degenerate else fit_logistic(feature, y, ridge)[1]
    lc = _lc_rate(y, feature, ridge)
    low = high = None
    if bootstrap and n > 1:
        rng = np.random.default_rng(seed)
        # The feature is recomputed per resample: its standardisation belongs to the fit.
        d_x, d_y = np.asarray(length_x), np.asarray(length_y)
        rates = []
        for _ in range(bootstrap):
            pick = rng.integers(0, n, n)
            rates.append(_lc_rate(y[pick], length_feature(d_x[pick], d_y[pick]), ridge))
        low, high = (float(v) for v in np.percentile(rates, [2.5, 97.5]))
    return {"n": n, "win_rate": float(y.mean()), "lc_win_rate": lc, "length_coef": coef, "lc_ci_low": low, "lc_ci_high": high}


# ---------------------------------------------------------------- pairwise verdicts as probabilities

Lengths = tuple[list[int], list[int]]  # per prompt, the lengths of X's and Y's answers (characters)


def verdict_probability(mass_a: float, mass_b: float) -> float:
    """P(A) = e^a / (e^a + e^b) for the log-masses of the verdicts "A" and "B", as sigmoid(a − b) without overflow."""
    return 0.5 * (1.0 + math.tanh(0.5 * (mass_a - mass_b)))


def probability_outcomes(p_first: list[float]) -> list[float]:
    """Per prompt, X's order-averaged probability of being better, from pair_requests' P(A) (X first, then Y
    first): p_x = (P(A | X first) + P(B | Y first)) / 2, so position bias cancels as in judge.prompt_outcome."""
    n = len(p_first) // 2
    return [(x_first + (1.0 - y_first)) / 2 for x_first, y_first in zip(p_first[:n], p_first[n:])]


def length_controlled(outcomes: list[float], judged: list[int], lengths: Lengths | None) -> dict[str, float | None]:
    """The length-controlled keys of a pairwise summary (none without lengths), over the judged prompts only."""
    if lengths is None:
        return {}
    lc = length_controlled_win_rate(outcomes, [lengths[0][i] for i in judged], [lengths[1][i] for i in judged])
    return {key: lc[key] for key in ("lc_win_rate", "lc_ci_low", "lc_ci_high", "length_coef")}


def win_rate(outcomes: list[float]) -> dict[str, float | int | None]:
    """Wins (both orders for X), losses (both for Y), ties (everything else), the mean and its 95% interval, and the
    exact sign test of wins against losses (`sign_p`: McNemar's test on the prompts the judge decided in both orders,
    ties dropped), the paired test of the two rows."""
    n = len(outcomes)
    if not n:
        return {"n": 0, "wins": 0, "ties": 0, "losses": 0, "win_rate": None, "ci_low": None, "ci_high": None, "sign_p": None}
    mean = sum(outcomes) / n
    std = math.sqrt(sum((o - mean) ** 2 for o in outcomes) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    wins, losses = sum(o == 1.0 for o in outcomes), sum(o == 0.0 for o in outcomes)
    return {"n": n, "wins": wins, "ties": n - wins - losses, "losses": losses, "win_rate": mean,
            "ci_low": max(0.0, mean - half), "ci_high": min(1.0, mean + half), "sign_p": mcnemar_exact(wins, losses)}


def probability_summary(p_first: list[float], lengths: Lengths | None = None) -> dict[str, Any]:
    """pairwise_summary's keys for logit verdicts: the win rate is the mean of the p_x (with win_rate's interval);
    a win (loss) is X (Y) preferred in both orders, a tie anything else; nothing is unparsed or failed."""
    n = len(p_first) // 2
    prefers_x = [(a > 0.5, b < 0.5) for a, b in zip(p_first[:n], p_first[n:])]  # per order: does the judge prefer X
    outcomes = probability_outcomes(p_first)
    wins, losses = sum(a and b for a, b in prefers_x), sum(not a and not b for a, b in prefers_x)
    return {**win_rate(outcomes), "wins": wins, "losses": losses, "ties": n - wins - losses, "sign_p": mcnemar_exact(wins, losses),
            "unparsed": 0, "failed": 0,
            "order_consistency": (wins + losses) / n if n else None, "method": "logit",
            **length_controlled(outcomes, list(range(n)), lengths)}


# ---------------------------------------------------------------- logit verdicts: reading the verdict token (judge.LocalJudge)
# The reply is forced to begin with "Verdict:", so the next token is the verdict; P(A) = softmax over the two
# verdicts' logits (each a logsumexp over the tokens that read "A" resp. "B": BPE vocabularies hold " A" and "A").
# One forward pass, nothing to parse, a probability instead of a coin (as AlpacaEval 2.0's weighted annotator reads
# its judge's log-probs of one verdict token; Dubois et al. 2024, arXiv 2404.04475).


def verdict_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids of every vocabulary token that decodes to "A" resp. "B" once whitespace is stripped (" A", "A", "ĠA"...)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    found: dict[str, list[int]] = {"A": [], "B": []}
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id]).strip()
        if text in found:
            found[text].append(token_id)
    if not found["A"] or not found["B"]:
        from ..errors import ModelError

        raise ModelError("the judge's tokenizer has no single token for the verdict 'A' or 'B'",
                         "use a text judge (--judge-url) or a local model with a byte-level or SentencePiece vocabulary")
    return found["A"], found["B"]


def verdict_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat with the generation prompt, then the fixed start of the reply: the next token is the verdict."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + VERDICT_PREFIX
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def last_token_logits(model: Any, prompts: list[list[int]], pad_id: int) -> Any:
    """(rows, vocab) float32 logits after each prompt's last token. Left padding puts every last token in the
    final column, so only that column's logits are computed (a full (rows, length, vocab) tensor would be GBs);
    the position ids count real tokens only, so a padded row sees what it would see alone."""
    import torch

    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=1, use_cache=False)
    return output.logits[:, -1].float().cpu()
