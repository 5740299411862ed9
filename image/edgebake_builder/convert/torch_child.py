"""The torch toolchain's side of convert-model: read a .pt2 or .onnx, run it in its own
framework for the gate, convert a .pt2 with litert-torch, and quantise any float .tflite
with ai-edge-quantizer. Runs as `python -m` in the torch toolchain venv, answers one JSON
line; imports nothing of the main venv's."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
REPRESENTATIVE_SAMPLES = 200


class ModelInputError(Exception):
    """A source model this toolchain cannot read; the message is the user's one line."""


def _torch() -> Any:
    import torch

    torch.set_num_threads(int(os.environ.get("EDGEBAKE_CONVERT_THREADS", "1")))
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:240]


NORMALIZATION = "normalization.json"  # a .pt2's extra file, or an ONNX metadata key


def load_program(path: Path, extra_files: dict[str, Any] | None = None) -> Any:
    torch = _torch()
    if not zipfile.is_zipfile(path):
        raise ModelInputError(f"{path}: not a torch.export archive (truncated, or not a .pt2)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise ModelInputError(f"{path}: a TorchScript or pickled model, not an ExportedProgram; "
                              "export it with torch.export.export(model, args) and "
                              "torch.export.save(program, 'model.pt2')")
    if not any("/models/" in name and name.endswith(".json") for name in names):
        raise ModelInputError(f"{path}: a zip archive that holds no torch.export program "
                              "(no models/*.json); save one with torch.export.save")
    try:
        return torch.export.load(str(path), extra_files=extra_files)
    except Exception as exc:
        raise ModelInputError(f"{path}: not a loadable torch.export ExportedProgram: "
                              f"{_first_line(exc)}") from None


def _program_shapes(program: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    signature = program.graph_signature
    user_inputs = set(signature.user_inputs)
    inputs: list[list[Any]] = []
    outputs: list[list[Any]] = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user_inputs:
            inputs.append(_dims(value.shape))
        if node.op == "output":
            for item in node.args[0]:
                shape = getattr(item, "meta", {}).get("val")
                outputs.append(_dims(shape.shape) if shape is not None else [])
    return inputs, outputs


def _dims(shape: Any) -> list[Any]:
    dims: list[Any] = []
    for d in shape:
        try:
            dims.append(int(d))
        except (TypeError, ValueError):
            dims.append(str(d))
    return dims


def load_onnx(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelInputError(f"{path}: not a readable ONNX model (truncated?): "
                              f"{_first_line(exc)}") from None
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ModelInputError(f"{path}: op {node.domain}.{node.op_type} (node {node.name!r}) "
                                  "is not a standard ONNX op; no converter turns it into "
                                  "TFLite builtins")
    return model


def _onnx_shapes(model: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    initializers = {t.name for t in model.graph.initializer}

    def dims(value: Any) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value.type.tensor_type.shape.dim]

    inputs = [dims(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [dims(v) for v in model.graph.output]


def inspect(payload: dict[str, Any]) -> dict[str, Any]:
    path = Path(payload["model"])
    if path.suffix == ".pt2":
        extra: dict[str, Any] = {NORMALIZATION: ""}
        program = load_program(path, extra)
        inputs, outputs = _program_shapes(program)
        import torch

        metadata = {NORMALIZATION: extra[NORMALIZATION]} if extra[NORMALIZATION] else {}
        return {"inputs": inputs, "outputs": outputs, "metadata": metadata,
                "framework": "torch", "version": str(torch.__version__)}
    model = load_onnx(path)
    inputs, outputs = _onnx_shapes(model)
    import onnxruntime

    return {"inputs": inputs, "outputs": outputs, "framework": "onnxruntime",
            "version": str(onnxruntime.__version__),
            "metadata": {p.key: p.value for p in model.metadata_props},
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                         default=0)}


def reference(payload: dict[str, Any]) -> dict[str, Any]:
    """The source framework's first output for each sample (given in the source layout)."""
    path = Path(payload["model"])
    x = np.load(payload["x"]).astype(np.float32)
    rows: list[Array] = []
    if path.suffix == ".pt2":
        torch = _torch()
        module = load_program(path).module()
        with torch.no_grad():
            for sample in x:
                out = module(torch.from_numpy(sample[None, ...].copy()))
                first = out[0] if isinstance(out, (tuple, list)) else out
                rows.append(first.detach().numpy()[0])
    else:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for sample in x:
            rows.append(session.run(None, {name: sample[None, ...]})[0][0])
    np.save(payload["out"], np.stack(rows).astype(np.float32))
    return {"samples": len(rows)}


def litert(payload: dict[str, Any]) -> dict[str, Any]:
    """.pt2 -> float32 .tflite; an NCHW input becomes NHWC, as the unit's frames are."""
    torch = _torch()
    import litert_torch

    program = load_program(Path(payload["model"]))
    module = program.module()
    shape = [int(d) for d in payload["input_shape"]]
    sample = torch.zeros(shape)
    if payload["layout"] == "NCHW":
        module = litert_torch.to_channel_last_io(module, args=[0])
        sample = sample.permute(0, 2, 3, 1).contiguous()
    try:
        edge = litert_torch.convert(module, (sample,))
    except Exception as exc:
        raise ModelInputError(f"{payload['model']}: litert-torch cannot convert it: "
                              f"{_first_line(exc)}") from None
    edge.export(payload["out"])
    return {"converter": "litert-torch", "version": str(litert_torch.__version__)}


def export_onnx(payload: dict[str, Any]) -> dict[str, Any]:
    """.pt2 -> .onnx, for converting a torch program with onnx2tf instead."""
    torch = _torch()
    module = load_program(Path(payload["model"])).module()
    sample = torch.zeros([int(d) for d in payload["input_shape"]])
    torch.onnx.export(module, (sample,), payload["out"], opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["output"])
    return {}


def quantize(payload: dict[str, Any]) -> dict[str, Any]:
    """A float .tflite -> float16 weights, dynamic-range int8, or full int8 (int8 in and
    out, calibrated on the representative samples)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    mode = payload["mode"]
    _add_signature(payload["model"])
    q = quantizer.Quantizer(payload["model"])
    if mode == "float16":
        q.add_weight_only_config(regex=".*", operation_name="*", num_bits=16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
    elif mode == "dynamic":
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    else:
        q.load_quantization_recipe(recipe.static_wi8_ai8())
    calibration = None
    if q.need_calibration:
        signatures = Interpreter(model_path=payload["model"]).get_signature_list()
        key, spec = next(iter(signatures.items()))
        name = spec["inputs"][0]
        samples = np.load(payload["representative"]).astype(np.float32)
        calibration = q.calibrate({key: [{name: s[None, ...]}
                                         for s in samples[:REPRESENTATIVE_SAMPLES]]})
    result = q.quantize(calibration)
    result.export_model(payload["out"], overwrite=True)
    import ai_edge_quantizer

    return {"quantizer": "ai-edge-quantizer",
            "version": str(getattr(ai_edge_quantizer, "__version__", "0.10"))}


def _add_signature(path: str) -> None:
    """Give a model without SignatureDefs one over its first subgraph's inputs and outputs:
    ai-edge-quantizer calibrates through a signature, and onnx2tf writes some models (YOLO11n)
    without any."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(path)
    if model.signatureDefs:
        return
    graph = model.subgraphs[0]

    def tensor_maps(indexes: Any) -> list[Any]:
        return [schema.TensorMapT(name=graph.tensors[int(i)].name, tensorIndex=int(i))
                for i in indexes]

    model.signatureDefs = [schema.SignatureDefT(inputs=tensor_maps(graph.inputs),
                                                outputs=tensor_maps(graph.outputs),
                                                signatureKey="serving_default")]
    flatbuffer_utils.write_model(model, path)


ACTIONS = {"inspect": inspect, "reference": reference, "litert": litert,
           "export_onnx": export_onnx, "quantize": quantize}


def main(action: str, payload: dict[str, Any]) -> dict[str, Any]:
    try:
        return ACTIONS[action](payload)
    except ModelInputError as exc:
        return {"error": str(exc)}


if __name__ == "__main__":
    answer = main(sys.argv[1], json.loads(sys.argv[2]))
    sys.stdout.flush()
    print(json.dumps(answer))
