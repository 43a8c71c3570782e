"""Grad-CAM of a fine-tuned open_clip density model on one mammogram, through radlens's own
code, as JSON. Run with the open_clip venv's Python: python explain_one.py MODEL_DIR IMAGE.png"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from radlens.tasks.mammo_density.model import breast_region
from radlens.tasks.mammo_density.saliency import explain
from radlens.tasks.mammo_density.train import load_model

model, card = load_model(Path(sys.argv[1]))
image = np.asarray(Image.open(sys.argv[2]), dtype=np.float32)
explained = explain(model, image, size=int(card["input_size"]))
rows, columns = np.nonzero(breast_region(image))
crop = np.zeros(image.shape, dtype=bool)
crop[rows.min():rows.max() + 1, columns.min():columns.max() + 1] = True
print(json.dumps({"kind": type(model).__name__, "category": explained.category,
                  "probabilities": explained.probabilities, "shares": explained.shares,
                  "cam_max": float(explained.cam.max()), "cam_shape": list(explained.cam.shape),
                  "outside_crop": float(explained.cam[~crop].sum())}))
