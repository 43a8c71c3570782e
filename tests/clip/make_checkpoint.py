"""Writes a small open_clip folder laid out as BiomedCLIP's published one
(open_clip_config.json with model_cfg and preprocess_cfg, open_clip_pytorch_model.bin): a ViT
image tower and a text tower with open_clip's own tokenizer, seeded, untrained. Run with the
open_clip venv's Python (make clip): python make_checkpoint.py OUT_DIR"""

import json
import sys
from pathlib import Path

import torch
from open_clip.model import CLIP

MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                   "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711]}

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = CLIP(**MODEL_CFG)
(out / "open_clip_config.json").write_text(json.dumps(
    {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}, indent=2))
torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
