"""`invoke example-models`: the ResNet18 and YOLO11n examples, made in the torch toolchain."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..convert import toolchain

CHILD = "edgebake_builder.examples.torch_models"
# The 80 COCO class names, in the order Ultralytics' detectors number them.
COCO_NAMES_TEXT = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush")
FILES = ("resnet18.pt2", "resnet18.onnx", "rep.npz", "val.npz", "yolo11n.onnx", "coco.txt")


def make_examples(out: Path, yolo_size: int = 320, say: Any = print) -> dict[str, Any]:
    """Write FILES into `out`, all of them or none (made in a temp folder, then moved)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".examples-", dir=out) as tmp:
        work = Path(tmp)
        say("      fine-tuning torchvision's resnet18 head on the digits (one thread)")
        trained = toolchain.call("torch", CHILD, "resnet18", {"out": str(work)}, say)
        say(f"      resnet18: {trained['accuracy']:.3f} accuracy on {trained['samples']} "
            "held-out digits")
        say(f"      building YOLO11n from its YAML (random weights), ONNX at {yolo_size}px")
        toolchain.call("torch", CHILD, "yolo11n", {"out": str(work), "size": yolo_size}, say)
        (work / "coco.txt").write_text("".join(f"{name.replace('_', ' ')}\n"
                                               for name in COCO_NAMES_TEXT.split()))
        for name in FILES:
            os.replace(work / name, out / name)
        for leftover in work.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover)
    return trained
