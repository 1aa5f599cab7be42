"""Doctor node: what this machine can run, and where a model's blocks would live (GPU / RAM / disk).

Thin: parses the inputs, calls :func:`..memory.doctor.diagnose`, shows its text."""

from __future__ import annotations

from ..units import GB

CATEGORY = "headroom"


def _budget(gb: float) -> int | None:
    """0 in the node means "the default"."""
    return None if gb <= 0 else int(gb * GB)


class HeadroomDoctor:
    """Doctor: GPUs, RAM, disk speed and the plan for a model file or folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_path": ("STRING", {"default": "", "tooltip": "A .safetensors file or a folder of them (empty: "
                                                                    "the machine only)"}),
                "gpu_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                            "tooltip": "VRAM for weights; 0 = 55 % of the card"}),
                "ram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 1.0,
                                            "tooltip": "RAM for streamed blocks, the rest is read from disk; 0 = what "
                                                       "this machine can spare"}),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def run(self, model_path: str, gpu_budget_gb: float, ram_budget_gb: float):
        from ..memory.doctor import DoctorError, diagnose, format_report

        try:
            text = format_report(diagnose(model_path.strip() or None, _budget(gpu_budget_gb), _budget(ram_budget_gb)))
        except DoctorError as err:
            raise ValueError(f"Doctor: {err}") from None
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS: dict = {"HeadroomDoctor": HeadroomDoctor}
NODE_DISPLAY_NAME_MAPPINGS: dict = {"HeadroomDoctor": "Doctor (what fits where)"}
