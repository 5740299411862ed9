"""A small CNN on scikit-learn's digits: a real model to convert in tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..convert.keras_source import import_tensorflow


def digits_data(seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any],
                                        np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(x_train, y_train, x_val, y_val); 8x8x1 images scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.8)
    return x[:split], y[:split], x[split:], y[split:]


def train_digits_cnn(folder: Path, epochs: int = 8, seed: int = 0) -> dict[str, Path]:
    """Train, save `digits.keras`, and write `representative.npz` and `validation.npz`."""
    tf = import_tensorflow()
    tf.keras.utils.set_random_seed(seed)
    x_train, y_train, x_val, y_val = digits_data(seed)
    model = tf.keras.Sequential([
        tf.keras.Input(shape=(8, 8, 1)),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": folder / "digits.keras", "representative": folder / "representative.npz",
             "validation": folder / "validation.npz"}
    model.save(paths["model"])
    np.savez(paths["representative"], x=x_train[:300])
    np.savez(paths["validation"], x=x_val, y=y_val)
    return paths
