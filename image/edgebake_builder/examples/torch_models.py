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


def _digits(torch: Any) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's digits, shuffled once, 80 % to train: images and labels of each part."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    split = len(order) * 4 // 5
    train, test = order[:split], order[split:]
    return (_digits_as_images(digits.data[train], torch),
            torch.from_numpy(digits.target[train].astype(np.int64)),
            _digits_as_images(digits.data[test], torch), digits.target[test].astype(np.int64))


def _batches(model: Any, x: Any, torch: Any) -> Any:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])


def _fit_head(model: Any, train_x: Any, train_y: Any, epochs: int, torch: Any) -> None:
    """Batch-norm statistics from the digits (one pass in training mode: an untrained
    network's activations then keep a sane range, which int8 needs), then the head alone
    trained on the features."""
    head = model.fc
    model.fc = torch.nn.Identity()
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a plain average over the pass
    model.train()
    _batches(model, train_x, torch)
    model.eval()
    features = _batches(model, train_x, torch)
    scale = features.std(dim=0, keepdim=True).mean() + 1e-6
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features / scale), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        head.weight /= scale
    model.fc = head


def _export(model: Any, sample: Any, out: Path, torch: Any) -> None:
    """.pt2 and .onnx, each carrying its normalisation, where convert-model reads it."""
    import onnx

    normalization = json.dumps({"mean": list(MEAN), "std": list(STD)})
    program = torch.export.export(model, (sample,))
    torch.export.save(program, str(out / "resnet18.pt2"),
                      extra_files={"normalization.json": normalization})
    onnx_path = out / "resnet18.onnx"
    torch.onnx.export(model, (sample,), str(onnx_path), opset_version=17,
                      dynamo=False, input_names=["input"], output_names=["logits"])
    exported = onnx.load(str(onnx_path))
    entry = exported.metadata_props.add()
    entry.key, entry.value = "normalization.json", normalization
    onnx.save(exported, str(onnx_path))


def resnet18(payload: dict[str, Any]) -> dict[str, Any]:
    """torchvision's resnet18 (weights=None), its head fine-tuned on the digits."""
    import torch
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(payload["out"])
    train_x, train_y, test_x, test_y = _digits(torch)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    _fit_head(model, train_x, train_y, int(payload.get("epochs", 300)), torch)
    model.eval()
    accuracy = float((_batches(model, test_x, torch).argmax(1).numpy() == test_y).mean())
    _export(model, test_x[:1], out, torch)
    np.savez(out / "rep.npz", x=train_x[:200].numpy())
    np.savez(out / "val.npz", x=test_x.numpy(), y=test_y)
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
