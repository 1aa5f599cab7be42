"""Run by tests/test_formats.py with ComfyUI's own Python (HEADROOM_COMFY_PYTHON), not collected by pytest.

Both directions of the INT8 interop, through ComfyUI's real code (comfy.ops + comfy_kitchen):

* read:  each ``--ours FILE`` (our converter's ``--layout comfy`` output) is loaded layer by layer into
  ComfyUI's ``mixed_precision_ops`` Linear with ``load_state_dict(strict=True)``; its dequantized weight and its
  forward on a fixed input are saved to ``OUT/comfy_read_<name>``.
* write: a random weight is quantized by comfy_kitchen (``QuantizedTensor.from_float``, tensor-wise and
  per-channel), put into ComfyUI's Linear and serialized with that Linear's own ``state_dict``; saved to
  ``OUT/kitchen_<mode>.safetensors`` together with the float weight.

usage: python comfy_int8_interop.py COMFYUI_DIR OUT [--ours FILE ...]
"""

import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("comfyui_dir")
parser.add_argument("out")
parser.add_argument("--ours", action="append", default=[])
opts = parser.parse_args()

sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its own command line at import
sys.path.insert(0, opts.comfyui_dir)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.ops  # noqa: E402
from comfy.quant_ops import QuantizedTensor  # noqa: E402

OPS = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.bfloat16)
torch.manual_seed(0)

for path in opts.ours:
    state = load_file(path)
    results = {}
    for key in [k for k in state if k.endswith(".comfy_quant")]:
        prefix = key[: -len("comfy_quant")]
        layer_sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        out_features, in_features = layer_sd["weight"].shape
        linear = OPS.Linear(in_features, out_features, bias="bias" in layer_sd, device="cpu")
        linear.load_state_dict(layer_sd, strict=True)
        assert isinstance(linear.weight, QuantizedTensor), f"{prefix}: ComfyUI did not load a quantized weight"
        x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        results[prefix + "dequantized"] = linear.weight.dequantize().float()
        results[prefix + "forward"] = linear(x).float()
        results[prefix + "input"] = x
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    save_file(results, f"{opts.out}/comfy_read_{name}")

weight = torch.randn(512, 1024)
for mode, per_channel in (("rowwise", True), ("tensorwise", False)):
    qt = QuantizedTensor.from_float(weight, "TensorWiseINT8Layout", per_channel=per_channel)
    linear = OPS.Linear(1024, 512, bias=False, device="cpu")
    linear.weight = torch.nn.Parameter(qt, requires_grad=False)
    linear.quant_format = "int8_tensorwise"
    linear.layout_type = "TensorWiseINT8Layout"
    sd = linear.state_dict(prefix="blocks.0.proj.")
    tensors = {k: (v._qdata if isinstance(v, QuantizedTensor) else v).contiguous() for k, v in sd.items()}
    tensors["reference.float_weight"] = weight
    tensors["reference.comfy_dequantized"] = qt.dequantize().float()
    save_file(tensors, f"{opts.out}/kitchen_{mode}.safetensors")
print("interop ok")
