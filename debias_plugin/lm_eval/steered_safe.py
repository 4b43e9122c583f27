"""`hf-steered-safe`: lm-eval's steered model reading our steer.safetensors (never a pickle) and also applying rank-k
erasers per hookpoint (h <- h - L R (h - mu); a projection is L = U, R = U^T), which lm-eval's .pt format cannot hold.

`--model hf-steered-safe --model_args pretrained=DIR,steer_path=OUT/steer.safetensors`. The file is written by
`debias direction` (methods/direction.py: tensors `<hookpoint>/steering_vector`, `<hookpoint>/bias`,
`<hookpoint>/erase/{proj_left,proj_right,bias}` and a JSON header `entries`)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.hf_steered import SteeredModel
from lm_eval.models.huggingface import HFLM

from debias_plugin.errors import DataError, DebiasError

FORMAT = "debias_plugin.steering/1"


def read_steering(path: str | Path) -> tuple[dict, dict]:
    """({hookpoint: lm-eval steering entry}, {hookpoint: (proj_left, proj_right, bias or None)}) from the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        raise DebiasError(f"steer_path {path}: expected an existing .safetensors file from `debias direction` "
                          "(hf-steered-safe never unpickles; lm-eval's `steered` model reads .pt files).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise DataError(path, "header field 'format'", FORMAT, repr(metadata.get("format")))
            try:
                entries = json.loads(metadata["entries"])
            except (KeyError, json.JSONDecodeError):
                raise DataError(path, "header field 'entries'", "the JSON of the steering entries") from None
            names = set(handle.keys())

            def tensor(name: str):
                if name not in names:
                    raise DataError(path, f"tensor '{name}'", "present (named in the header)", "missing")
                return handle.get_tensor(name)

            try:
                steer = {point: {"steering_vector": tensor(f"{point}/steering_vector"),
                                 "steering_coefficient": float(info["steering_coefficient"]),
                                 "action": info["action"], "head_index": info.get("head_index"),
                                 "bias": tensor(f"{point}/bias") if info.get("bias") else None}
                         for point, info in entries.get("steer", {}).items()}
                erase = {point: (tensor(f"{point}/erase/proj_left"), tensor(f"{point}/erase/proj_right"),
                                 tensor(f"{point}/erase/bias") if info.get("bias") else None)
                         for point, info in entries.get("erase", {}).items()}
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                if isinstance(err, DataError):
                    raise
                raise DataError(path, "header field 'entries'", "{steer: {hookpoint: {steering_coefficient, "
                                "action, head_index, bias}}, erase: {hookpoint: {rank, bias}}}",
                                f"a problem with {err}") from None
    except SafetensorError as err:
        raise DataError(path, "file", "a readable safetensors file", str(err)) from None
    both = sorted(set(steer) & set(erase))
    if both:
        raise DataError(path, f"hookpoint '{both[0]}'", "either a steering entry or an eraser", "both")
    return steer, erase


@register_model("hf-steered-safe")
class SafeSteeredModel(SteeredModel):
    """lm-eval's SteeredModel (its hooks, add and clamp) with the steering file read from safetensors, plus erasers."""

    def __init__(self, pretrained: str, steer_path: str, device: str | None = None, **kwargs):
        steer, erase = read_steering(steer_path)  # before the model loads: a bad file fails in a second
        HFLM.__init__(self, pretrained=pretrained, device=device, **kwargs)  # SteeredModel's own would torch.load
        self.hook_to_steer = {point: self._steering(info) for point, info in steer.items()}
        self.hook_to_steer.update({point: self._eraser(*tensors) for point, tensors in erase.items()})
        known = {name for name, _ in self.model.base_model.named_modules()}
        missing = sorted(set(self.hook_to_steer) - known)
        if missing:
            raise DebiasError(f"steer_path {steer_path}: hookpoint(s) {', '.join(missing)} are not modules of "
                              f"{pretrained}'s model.base_model (written for another architecture?).")

    def _on_model(self, tensor):
        return None if tensor is None else tensor.to(self.device).to(self.model.dtype)

    def _steering(self, info: dict):
        """The same hook function SteeredModel builds from a .pt entry."""
        vector, bias = self._on_model(info["steering_vector"]), self._on_model(info["bias"])
        coefficient, head = info["steering_coefficient"], info["head_index"]
        if info["action"] == "add":
            if bias is not None:
                raise DebiasError("steer_path: lm-eval's add action takes no bias.")
            return partial(self.add, vector=vector * coefficient, head_index=head)
        if info["action"] == "clamp":
            return partial(self.clamp, direction=vector / vector.norm(), value=coefficient, bias=bias,
                           head_index=head)
        raise DebiasError(f"steer_path: unknown action {info['action']!r}; expected add or clamp.")

    def _eraser(self, left, right, bias):
        from concept_erasure import LeaceEraser

        return LeaceEraser(self._on_model(left), self._on_model(right), self._on_model(bias))
