"""The demo corpus's transcriptions: Spanish sentences from per-emotion templates.

Words carry the label for most emotional clips, but not all: ~30 % of emotional clips use
neutral wording (text alone must miss them) and a few neutral clips borrow another
emotion's wording (``make_sentence``).
"""
from __future__ import annotations

import numpy as np

from ser_hpc.data.labels import EMOSPEECH_LABELS as LABELS

AMBIGUOUS_TEXT = 0.30  # emotional clips whose sentence is neutral wording
NEUTRAL_NOISE = 0.08   # neutral clips whose sentence borrows another emotion's wording

TOPICS = [  # singular only, so every template agrees in number
    "el gobierno", "la reforma", "el ayuntamiento", "esta ley", "la oposición", "el ministro",
    "la asociación de vecinos", "la empresa", "el equipo", "mi familia", "la sanidad pública",
    "la juventud", "el pueblo", "la universidad", "el sector agrícola", "la selección",
    "nuestra ciudad", "el sindicato", "la comunidad educativa", "el club", "la fundación",
]
OPENERS = ["", "", "", "Bueno, ", "Mire, ", "Pues ", "A ver, ", "Sinceramente, ", "Yo creo que ",
           "La verdad es que ", "Miren ustedes, ", "Oiga, "]
TAILS = ["", "", "", " ...", ", y lo digo claramente", ", ¿no?", " y punto", ", eso es todo",
         " ... de verdad", ", como siempre"]
# {t} is a topic; templates carry the emotion in their wording.
TEMPLATES = {
    "neutral": [
        "{t} presentará el informe la próxima semana",
        "la sesión comenzará a las diez de la mañana en el salón de actos",
        "según los datos, {t} ha registrado un aumento del tres por ciento",
        "vamos a analizar la propuesta de {t} punto por punto",
        "el debate continuará mañana en el pleno, después de la votación",
        "hay que revisar el calendario con {t} antes de fin de mes",
        "les explico brevemente cómo funciona el procedimiento",
        "{t} se reunirá con los representantes el jueves por la tarde",
        "en primer lugar, quiero agradecer la invitación a {t}",
        "hablamos ahora de la situación de {t} en la región",
        "como dice el refrán, \"a quien madruga, Dios le ayuda\"",
        "el documento tiene tres partes y un anexo con las cifras",
        "{t} publicará las bases de la convocatoria en febrero",
        "unidos las instituciones, unidos los ciudadanos, seguimos trabajando",
        "¿cuántas personas participan este año en el programa de {t}?",
    ],
    "disgust": [
        "me da asco cómo se comporta {t}",
        "es repugnante lo que hemos visto en {t}",
        "qué vergüenza, de verdad, qué asco me da todo esto",
        "resulta nauseabundo el cinismo de {t}",
        "me produce un profundo rechazo la actitud de {t}",
        "da grima escuchar las excusas de {t}",
        "qué cosa tan asquerosa, por favor, no hay quien lo aguante",
        "es vomitivo que {t} se ría de la gente así",
        "me repugna la hipocresía de {t}, es lamentable",
        "qué bochorno, {t} ha caído en lo más bajo",
    ],
    "anger": [
        "estoy harto de que {t} nos tome el pelo",
        "es indignante lo que ha hecho {t}",
        "¡basta ya de mentiras, basta ya!",
        "me enfurece que {t} siga sin dar explicaciones",
        "no vamos a tolerar este atropello de {t}",
        "exigimos responsabilidades a {t}, ya está bien",
        "pedimos que se tiren de las orejas a quien ha paralizado {t}",
        "qué rabia me da ver cómo {t} nos ignora",
        "¡esto es un escándalo y {t} tiene la culpa!",
        "estamos hartos, furiosos, y no nos vamos a callar",
    ],
    "sadness": [
        "estoy muy triste por lo que le ha pasado a {t}",
        "es una pena enorme, lo echamos mucho de menos",
        "hoy es un día muy duro para {t}",
        "me duele en el alma ver así a {t}",
        "lloramos la pérdida de un compañero irrepetible",
        "nos deja un vacío imposible de llenar",
        "siento una tristeza profunda, no encuentro palabras",
        "ojalá pudiera volver atrás y despedirme",
        "qué desolación, {t} ha perdido lo que más quería",
        "se nos rompe el corazón al pensar en {t}",
    ],
    "joy": [
        "¡qué alegría tan grande!",
        "estamos felices con el resultado de {t}",
        "acertamos cuando estamos unidos",
        "es un orgullo enorme celebrar este logro con {t}",
        "qué maravilla, ¡lo hemos conseguido!",
        "me encanta ver la ilusión de {t}",
        "gracias de corazón, estamos encantados",
        "hoy celebramos una victoria histórica para {t}",
        "¡enhorabuena a {t}, os lo merecéis!",
        "estoy feliz, emocionado y muy agradecido",
    ],
    "fear": [
        "tengo mucho miedo de lo que pueda pasar con {t}",
        "me aterra pensar en las consecuencias para {t}",
        "estamos asustados, nadie sabe qué va a ocurrir",
        "tengo pánico a que esto vuelva a suceder",
        "qué angustia, no sabemos si {t} está a salvo",
        "temo que {t} no pueda resistir otro golpe así",
        "¿y si nos quedamos sin nada? Me da terror",
        "tiemblo solo de pensar en lo que viene",
    ],
}


def _cap(s: str) -> str:
    i = next((k for k, c in enumerate(s) if c.isalpha()), 0)  # skip leading ¿ ¡
    return s[:i] + s[i].upper() + s[i + 1:]


def _clause(rng: np.random.Generator, pool: str) -> str:
    tpl = str(rng.choice(TEMPLATES[pool]))
    topic = str(rng.choice(TOPICS))
    text = tpl.replace("{t}", topic)
    return text.replace(" de el ", " del ").replace(" a el ", " al ")


def _sentence(rng: np.random.Generator, pool: str) -> str:
    clause = _clause(rng, pool)
    opener = str(rng.choice(OPENERS))
    if clause[0] in "¿¡" and not opener.endswith(", "):
        opener = ""  # "Yo creo que ¿cuántas...?" reads wrong
    text = opener + clause
    if text[-1] not in "!?\"":
        text += str(rng.choice(TAILS))
    text = _cap(text)
    if not text.endswith(("!", "?", "...", '"')):
        text += "."
    if rng.random() < 0.35:  # a second sentence, as in the real multi-sentence rows
        second = _cap(_clause(rng, pool))
        text += " " + second + ("" if second[-1] in "!?\"" else str(rng.choice([".", ". ...", "..."])))
    return text


def make_sentence(rng: np.random.Generator, label: str) -> tuple[str, bool]:
    """A transcription for ``label``; the flag says whether its wording misleads."""
    others = [e for e in LABELS if e != "neutral"]
    if label != "neutral" and rng.random() < AMBIGUOUS_TEXT:
        return _sentence(rng, "neutral"), True
    if label == "neutral" and rng.random() < NEUTRAL_NOISE:
        return _sentence(rng, str(rng.choice(others))), True
    return _sentence(rng, label), False


def demo_sentences(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences from the same templates, e.g. to train the demo tokenizers."""
    rng = np.random.default_rng(seed)
    return [_sentence(rng, LABELS[i % len(LABELS)]) for i in range(n)]
