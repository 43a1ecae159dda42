"""French and Spanish answer checks for the cod example (`opdistill eval --check languages:french`).

The project's built-in `french` check counts words such as "la", "de", "que" and "un" as French evidence, and
those are Spanish too: it calls many Spanish answers French. Here each language counts only words,
letters and (French) elisions such as l'/d'/qu' that the other one and English do not use, and an answer is in a language when that evidence is at
least 3 and more than twice the strongest other language's.
"""

from __future__ import annotations

import re

FRENCH = frozenset("le les et est sont une des du au aux pour dans avec sur pas ne qui vous votre vos nous notre je tu il elle ils "
                   "elles ce cette ces mais ou très plus aussi son ses leur leurs mon ma mes être avoir faire peut bien été c'est".split())
SPANISH = frozenset("el los las es y son para con por del al como más pero muy también su sus este esta estos estas hay ser estar "
                    "tiene puede lo una uno mi tu yo usted nosotros ellos ellas cuando donde porque".split())
ENGLISH = frozenset("the and is are be to of for in on with that this it you your we our they their he she his her but or so "
                    "very more also as at by from have has can will would should what which who how not do does an".split())
FRENCH_LETTERS = re.compile(r"[èêàçùûôîœâëï]")
SPANISH_LETTERS = re.compile(r"[ñ¿¡áíóú]")
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
ELISION = re.compile(r"\b(?:l|d|qu|n|j|c|s)'[^\W\d_]", re.IGNORECASE)  # l'adresse, d'un, qu'il: French only


def evidence(text: str) -> dict[str, int]:
    words = [w.lower() for w in WORD.findall(text)]
    lowered = text.lower()
    return {"french": sum(w in FRENCH for w in words) + len(FRENCH_LETTERS.findall(lowered)) + len(ELISION.findall(text)),
            "spanish": sum(w in SPANISH for w in words) + len(SPANISH_LETTERS.findall(lowered)),
            "english": sum(w in ENGLISH for w in words)}


def _is(language: str, text: str) -> bool:
    scores = evidence(text)
    others = max(v for k, v in scores.items() if k != language)
    return scores[language] >= 3 and scores[language] > 2 * others


def french(text: str) -> bool:
    return _is("french", text)


def spanish(text: str) -> bool:
    return _is("spanish", text)
