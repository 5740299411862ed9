"""Makes the example PyTorch models; runs in the torch toolchain (`python -m`), answers one
JSON line. Training uses one thread: on a busy 2-core host torch's default thread count is
many times slower."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# torchvision's normalisation, which the card carries to the unit
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 64


def _digits_as_images(x: Any, torch: Any) -> Any:
    """8x8 grey digits (0-16) -> normalised [N, 3, 64, 64] tensors, as torchvision feeds them."""
    pixels = torch.from_numpy(np.asarray(x, np.float32).reshape(-1, 1, 8, 8) / 16.0)
    big = torch.nn.functional.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear",
                                          align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (big - mean) / std


def resnet18(payload: dict[str, Any]) -> dict[str, Any]:
    """torchvision's resnet18 (weights=None), its head fine-tuned on the digits."""
    import torch
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    out = Path(payload["out"])
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    split = len(order) * 4 // 5
    data = {"train_x": digits.data[order[:split]], "train_y": digits.target[order[:split]],
            "test_x": digits.data[order[split:]], "test_y": digits.target[order[split:]]}
    train_x = _digits_as_images(data["train_x"], torch)
    train_y = torch.from_numpy(data["train_y"].astype(np.int64))
    test_x = _digits_as_images(data["test_x"], torch)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    head = model.fc
    model.fc = torch.nn.Identity()
    # Batch norm statistics from the digits (one pass in training mode, no gradients): an
    # untrained network's activations then keep a sane range, which int8 needs.
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a plain average over the pass
    model.train()
    with torch.no_grad():
        for i in range(0, len(train_x), 64):
            model(train_x[i:i + 64])
    model.eval()
    with torch.no_grad():
        features = torch.cat([model(train_x[i:i + 64]) for i in range(0, len(train_x), 64)])
    scale = features.std(dim=0, keepdim=True).mean() + 1e-6
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(int(payload.get("epochs", 300))):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features / scale), train_y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head.weight /= scale
    model.fc = head
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(test_x[i:i + 64]) for i in range(0, len(test_x), 64)])
    accuracy = float((predicted.argmax(1).numpy() == data["test_y"]).mean())
    sample = test_x[:1]
    # the normalisation travels with the model, where convert-model reads it
    normalization = json.dumps({"mean": list(MEAN), "std": list(STD)})
    program = torch.export.export(model, (sample,))
    torch.export.save(program, str(out / "resnet18.pt2"),
                      extra_files={"normalization.json": normalization})
    onnx_path = out / "resnet18.onnx"
    torch.onnx.export(model, (sample,), str(onnx_path), opset_version=17,
                      dynamo=False, input_names=["input"], output_names=["logits"])
    import onnx

    exported = onnx.load(str(onnx_path))
    entry = exported.metadata_props.add()
    entry.key, entry.value = "normalization.json", normalization
    onnx.save(exported, str(onnx_path))
    np.savez(out / "rep.npz", x=train_x[:200].numpy())
    np.savez(out / "val.npz", x=test_x.numpy(), y=data["test_y"].astype(np.int64))
    return {"accuracy": accuracy, "samples": len(test_x)}


def yolo11n(payload: dict[str, Any]) -> dict[str, Any]:
    """Ultralytics YOLO11n built from its YAML (random weights), exported to ONNX."""
    import os
    import shutil

    os.environ["YOLO_OFFLINE"] = "1"
    import torch
    from ultralytics import YOLO

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(payload["out"])
    here = os.getcwd()
    os.chdir(out)
    try:
        exported = YOLO("yolo11n.yaml").export(format="onnx", imgsz=int(payload["size"]),
                                               simplify=False, opset=17)
    finally:
        os.chdir(here)
    target = out / "yolo11n.onnx"
    made = out / exported  # relative to the folder it was made in
    if made.resolve() != target.resolve():
        shutil.move(made, target)
    return {"model": str(target)}


if __name__ == "__main__":
    action, raw = sys.argv[1], json.loads(sys.argv[2])
    answer = {"resnet18": resnet18, "yolo11n": yolo11n}[action](raw)
    sys.stdout.flush()
    print(json.dumps(answer))
