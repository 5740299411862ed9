"""The model the service will serve: a loadable TFLite file, and the one its card names."""

from __future__ import annotations

from pathlib import Path

from .card import Card, CardError, card_path_for, load_card
from .digest import sha256_file
from .interp import ModelError, check_tflite_file, probe_model


class StartupError(Exception):
    """The service cannot start (bad model or card); the message goes to STATUS= and the log."""


def load_checked_card(model: Path, card_path: Path | None) -> Card:
    """The model's card, once the model is a loadable TFLite file whose sha256 the card names."""
    try:
        check_tflite_file(model)
        card = load_card(card_path or card_path_for(model))
    except (ModelError, CardError) as exc:
        raise StartupError(str(exc)) from None
    actual = sha256_file(model)
    if actual != card.sha256:
        raise StartupError(f"{model}: sha256 {actual[:16]}… does not match its card "
                           f"({card.sha256[:16]}…); refusing a model that was changed")
    try:
        probe_model(model)
    except ModelError as exc:
        raise StartupError(str(exc)) from None
    return card
