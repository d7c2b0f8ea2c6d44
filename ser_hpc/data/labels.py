"""The EmoSPeech 2024 label set, in the authors' id order."""

LABELS: tuple[str, ...] = ("neutral", "disgust", "anger", "sadness", "joy", "fear")
LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
NUM_CLASSES = len(LABELS)
