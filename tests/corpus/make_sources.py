"""Writes the bad model sources of the corpus (tests/corpus/sources/); run it with the torch
toolchain's Python: `$(invoke toolchain --name torch) tests/corpus/make_sources.py`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent / "sources"


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def conv_onnx(height: int | str, width: int | str, domain: str = "") -> onnx.ModelProto:
    out_h = height - 2 if isinstance(height, int) else f"{height}_out"
    out_w = width - 2 if isinstance(width, int) else f"{width}_out"
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.01] * 108)
    op = "Conv" if not domain else "FancyConv"
    node = helper.make_node(op, ["x", "w"], ["y"], name="conv0", domain=domain)
    graph = helper.make_graph(
        [node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                       [1, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, out_h, out_w])],
        [weight])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def main() -> None:
    HERE.mkdir(exist_ok=True)
    model, example = tiny(), torch.zeros(1, 3, 16, 16)
    torch.jit.save(torch.jit.trace(model, example), str(HERE / "torchscript.pt"))
    torch.jit.save(torch.jit.trace(model, example), str(HERE / "torchscript-renamed.pt2"))
    with zipfile.ZipFile(HERE / "not-an-exported-program.pt2", "w") as archive:
        archive.writestr("model/notes.txt", "a zip file, but no program in it\n")
    whole = HERE / "whole.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(whole))
    data = whole.read_bytes()
    (HERE / "truncated.pt2").write_bytes(data[: len(data) // 2])
    whole.unlink()
    onnx.save(conv_onnx("height", "width"), str(HERE / "dynamic-size.onnx"))
    onnx.save(conv_onnx(16, 16, domain="com.example"), str(HERE / "custom-op.onnx"))
    good = conv_onnx(16, 16).SerializeToString()
    (HERE / "truncated.onnx").write_bytes(good[: len(good) // 2])


if __name__ == "__main__":
    main()
