"""Example models made on this machine (nothing is downloaded): a ResNet18 digit classifier
as .pt2 and .onnx, and an untrained YOLO11n detector as .onnx."""
