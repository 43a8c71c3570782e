"""A trained network as a TorchScript file, for sites that serve models outside radlens.

The file holds the network only (the card, embedded as ``card.json``, says what input it
takes); it is traced on an example input, saved, loaded back and run again, and refused when
the reloaded network does not give the same output. Checked first: ONNX export
(``torch.onnx.export``) needs the ``onnx`` and ``onnxscript`` packages, which radlens does not
depend on; TorchScript needs nothing beyond torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radlens.models.cards import ModelError, sha256


def export_torchscript(network: nn.Module, example: torch.Tensor, out: Path,
                       card: dict[str, Any], *, tolerance: float = 1e-4) -> str:
    """Trace ``network`` on ``example`` into ``out`` with the card embedded; returns a line
    saying what was written. Raises ModelError when tracing fails or the saved network's
    output differs from the original's."""
    network = network.eval().cpu()
    example = example.cpu()
    try:
        with torch.inference_mode():
            expected = network(example)
            traced = torch.jit.trace(network, example, strict=False, check_trace=False)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the same refusal
        raise ModelError(f"cannot trace {card.get('name')}: {type(exc).__name__}: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(out), _extra_files={"card.json": json.dumps(card)})
    reloaded = torch.jit.load(str(out), map_location="cpu")
    with torch.inference_mode():
        again = reloaded(example)
    difference = float((again - expected).abs().max())
    if difference > tolerance:
        out.unlink()
        raise ModelError(f"the exported network's output differs by {difference:g} "
                         f"(more than {tolerance:g}): not written")
    return (f"wrote {out} (TorchScript, input {tuple(example.shape)}, output "
            f"{tuple(expected.shape)}, SHA-256 {sha256(out)[:16]}...; the card is embedded "
            "as card.json)")
