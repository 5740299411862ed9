"""A model loaded inside a camera process: its interpreter and the card's pre- and
postprocessing, with input tensors reused from frame to frame."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..card import Card, load_card
from ..frames import Frame
from ..interp import load_interpreter
from ..postprocess import decoder_for
from ..preprocess import Preprocessor

# A recording is read this many frames ahead (the spare input tensors follow it).
READ_AHEAD = 8
NO_PIXELS = np.zeros((0, 0, 3), np.uint8)


@dataclasses.dataclass
class LoadedModel:
    """One model ready to run: its interpreter, the card's pre- and postprocessing."""

    card: Card
    interpreter: Any
    input_index: int
    input_buffer: Callable[[], np.ndarray[Any, Any]]  # a view of the interpreter's own input
    outputs: list[int]
    preprocessor: Preprocessor
    decode: Callable[..., dict[str, Any]]
    generation: int
    first_invoke_sec: float  # at load: what an invoke takes, give or take the weights' packing
    # Input tensors to prepare frames into, given back once copied into the interpreter:
    # a fresh 200 KB array per frame costs page faults and, freed, the other core's TLB.
    spare_inputs: collections.deque[np.ndarray[Any, Any]] = dataclasses.field(
        default_factory=collections.deque)

    def prepare(self, frame: Frame) -> None:
        """Turn the frame's image into this model's input tensor, in a spare one if any."""
        spares = self.spare_inputs
        frame.image, frame.placement = self.preprocessor(frame.image,
                                                         spares.pop() if spares else None)
        frame.generation = self.generation

    def fill_input(self, frame: Frame) -> None:
        """Put the frame into the interpreter's input: copied in when the source thread has
        prepared it (the tensor is then a spare again), else prepared straight into it."""
        if frame.placement is not None:
            self.interpreter.set_tensor(self.input_index, frame.image)
            if len(self.spare_inputs) < READ_AHEAD + 2:
                self.spare_inputs.append(frame.image)
        else:
            view = self.input_buffer()
            filled, frame.placement = self.preprocessor(frame.image, view)
            del filled, view  # invoke() refuses to run while a view of its buffers is alive
        frame.image = NO_PIXELS  # its tensor may now hold another frame

    @classmethod
    def load(cls, model: Path, card_path: Path, version: str, threads: int, generation: int
             ) -> LoadedModel:
        card = load_card(card_path)
        card.data["version"] = version  # a bundle's version names its model
        interpreter = load_interpreter(model, num_threads=threads)
        details = interpreter.get_input_details()[0]
        expected = [int(x) for x in details["shape"]]
        if expected != list(card.inputs[0].shape):
            raise ValueError(f"model input shape {expected} does not match the card's "
                             f"{list(card.inputs[0].shape)}")
        # one invoke now, so that whatever the runtime does at the first one (XNNPACK packs
        # the weights) happens here, beside the running model, not on the first frame
        interpreter.set_tensor(details["index"], np.zeros(details["shape"], details["dtype"]))
        began = time.monotonic()
        interpreter.invoke()
        first_invoke = time.monotonic() - began
        return cls(card, interpreter, int(details["index"]),
                   interpreter.tensor(int(details["index"])),
                   [int(d["index"]) for d in interpreter.get_output_details()],
                   Preprocessor(card), decoder_for(card), generation, first_invoke)
