"""Ultralytics' own YOLO postprocessing, run in the torch toolchain for the decoder test:
reads raw heads [n, 4 + classes, anchors] from an .npy, writes each one's detections."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torchvision  # noqa: F401  (Ultralytics uses torchvision's NMS once it is imported)
from ultralytics.utils.nms import non_max_suppression

torch.set_num_threads(1)
heads = torch.from_numpy(np.load(sys.argv[1]).astype(np.float32))
conf, iou, max_det = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
found = []
for head in heads:
    out = non_max_suppression(head[None], conf_thres=conf, iou_thres=iou, max_det=max_det)[0]
    found.append({"boxes": out[:, :4].tolist(), "scores": out[:, 4].tolist(),
                  "classes": [int(c) for c in out[:, 5].tolist()]})
with open(sys.argv[2], "w", encoding="utf-8") as sink:
    json.dump(found, sink)
