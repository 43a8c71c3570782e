"""A MONAI bundle as a task: a folder in the MONAI Model Zoo's layout (``configs/metadata.json``,
``configs/inference.json``, ``models/model.pt``) that an administrator names in the
configuration (``bundles``), with the scope it is valid for.

radlens reads the bundle with ``monai.bundle.ConfigParser``: the network (``network_def``), the
``preprocessing``, ``inferer`` and ``postprocessing`` of its inference config, less the
transforms that read or write files (radlens hands the pixels in memory and writes the outputs
itself). The weights load with ``torch.load(weights_only=True)``. Its label map becomes SEG
segments named from the metadata's output channel definition, and its areas or volumes SR
measurements; the SR says the model has no out-of-distribution check. A bundle's configs
instantiate Python objects named in them, so a bundle is code: only bundles named in the
configuration are ever loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from radlens.findings import ModelRef
from radlens.logs import kv
from radlens.models.cards import ModelError
from radlens.models.scope import ModelScope
from radlens.tasks.base import (
    ImageInput,
    LoadedTask,
    SeriesVolume,
    TaskError,
    TaskResult,
)
from radlens.tasks.labelmap import (
    LabelDefinition,
    LabelMapReading,
    LabelMapTask,
    label_stats,
    log_reading,
    write_label_map,
)
from radlens.timing import StageTimes

if TYPE_CHECKING:
    from radlens.config import Settings
    from radlens.config.settings import BundleSettings

log = logging.getLogger(__name__)

METADATA = Path("configs") / "metadata.json"
INFERENCE = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
# Transforms that read or write files: radlens gives the image in memory and writes its own
# outputs, so these are left out of the bundle's pre- and postprocessing.
FILE_TRANSFORMS = frozenset({"LoadImage", "LoadImaged", "SaveImage", "SaveImaged",
                             "LoadImageD", "LoadImageDict", "SaveImageD", "SaveImageDict"})


def read_metadata(folder: Path) -> dict[str, Any]:
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise TaskError(f"bundle {folder}: cannot read {METADATA}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise TaskError(f"bundle {folder}: {METADATA} is not a JSON object")
    return metadata


def output_labels(metadata: dict[str, Any], key: str) -> tuple[LabelDefinition, ...]:
    """The labels of the output ``key`` from the metadata's channel definition (channel 0, the
    background, is no label)."""
    outputs = (metadata.get("network_data_format", {}) or {}).get("outputs", {}) or {}
    channels = (outputs.get(key, {}) or {}).get("channel_def", {}) or {}
    labels = []
    for value, name in sorted(((int(v), str(n)) for v, n in channels.items()
                               if str(v).isdigit()), key=lambda item: item[0]):
        if value > 0:
            labels.append(LabelDefinition(value=value, name=name[:64]))
    return tuple(labels)


class BundleTask(LabelMapTask):
    """One configured bundle. Its name is the configured one; its card is built from the
    bundle's metadata and the configured scope."""

    has_ood_check = False

    def __init__(self, config: BundleSettings) -> None:
        self.config = config
        self.folder = Path(config.path)
        self.metadata = read_metadata(self.folder)
        self.name = config.name  # type: ignore[misc]
        self.title = (f"MONAI bundle {self.metadata.get('name') or self.folder.name}")[:80]  # type: ignore[misc]
        self.unit = config.unit  # type: ignore[misc]
        self.origin = f"bundle {self.folder}"
        self.labels = (tuple(config.labels) or  # type: ignore[misc]
                       output_labels(self.metadata, config.output_key))
        if not self.labels:
            raise TaskError(f"bundle {config.name}: its metadata names no output label "
                            f"(network_data_format.outputs.{config.output_key}.channel_def) and "
                            "the configuration gives none (bundles[].labels)")

    def enabled(self, settings: Settings) -> bool:
        return self.config.enabled

    def weights(self, settings: Settings) -> str:
        return str(self.folder)

    def card(self, settings: Settings | None = None) -> dict[str, Any]:
        return {"name": str(self.metadata.get("name") or self.folder.name),
                "version": str(self.metadata.get("version") or "unknown"),
                "architecture": f"MONAI bundle {self.folder.name}",
                "scope": self.config.scope.model_dump(mode="json"),
                "intended_use": self.config.scope.intended_use,
                "training_data": (f"Trained on {source}." if (source := str(
                    self.metadata.get("data_source") or "").strip().rstrip(".")) else None),
                "labels": [label.model_dump() for label in self.labels]}

    def scope(self, settings: Settings | None = None) -> ModelScope | None:
        return self.config.scope

    def load(self, settings: Settings, *, device: str) -> LoadedBundle:
        try:
            return LoadedBundle.load(self, device)
        except TaskError:
            raise
        except Exception as exc:  # a bundle is code: whatever it raises stops the start
            raise TaskError(f"cannot load bundle {self.name} from {self.folder}: "
                            f"{type(exc).__name__}: {exc}") from exc


def _without_file_transforms(transform: Any) -> Any:
    """A bundle's Compose less the transforms that read or write files."""
    from monai.transforms import Compose

    if transform is None:
        return None
    inner = list(getattr(transform, "transforms", [transform]))
    kept = [t for t in inner if type(t).__name__ not in FILE_TRANSFORMS]
    return Compose(kept)


class LoadedBundle(LoadedTask):
    """A bundle's network, transforms and inferer, on a device."""

    def __init__(self, task: BundleTask, network: Any, preprocessing: Any, inferer: Any,
                 postprocessing: Any, device: str) -> None:
        self.task = task
        self.card = task.card()
        self.network, self.preprocessing, self.inferer = network, preprocessing, inferer
        self.postprocessing = postprocessing
        self.device = device

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.card["name"], version=self.card["version"],
                        architecture=self.card["architecture"],
                        training_data=self.card.get("training_data"))

    @classmethod
    def load(cls, task: BundleTask, device: str) -> LoadedBundle:
        import torch
        from monai.bundle import ConfigParser
        from monai.inferers import SimpleInferer

        folder = task.folder
        for part in (INFERENCE, WEIGHTS):
            if not (folder / part).is_file():
                raise TaskError(f"bundle {task.name}: {folder / part} is missing")
        parser = ConfigParser()
        parser.read_meta(str(folder / METADATA))
        parser.read_config(str(folder / INFERENCE))
        parser["bundle_root"] = str(folder)
        parser["device"] = f"$torch.device('{device}')"
        network = parser.get_parsed_content("network_def")
        state = torch.load(folder / WEIGHTS, map_location=device, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a training checkpoint: the network's part
        try:
            network.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise ModelError(f"bundle {task.name}: {WEIGHTS} does not fit network_def: "
                             f"{exc}") from exc
        network.to(device).eval()

        def part(name: str) -> Any:
            return parser.get_parsed_content(name) if name in parser.config else None

        inferer = part("inferer") or SimpleInferer()
        loaded = cls(task, network, _without_file_transforms(part("preprocessing")), inferer,
                     _without_file_transforms(part("postprocessing")), device)
        log.info("bundle loaded", extra=kv(task=task.name, folder=str(folder),
                                           labels=",".join(d.name for d in task.labels)))
        return loaded

    def _labels(self, array: np.ndarray, affine: Any = None) -> np.ndarray:
        """The bundle's label map of one channel-less array, at the array's own shape."""
        import torch
        from monai.data import MetaTensor

        key, out_key = self.task.config.input_key, self.task.config.output_key
        image = MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
                           affine=affine)
        data: dict[str, Any] = {key: image}
        if self.preprocessing is not None:
            data = self.preprocessing(data)
        with torch.inference_mode():
            batch = data[key][None].to(self.device)
            data[out_key] = self.inferer(batch, self.network)[0]
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        output = data[out_key]
        output = output.detach().cpu().numpy() if hasattr(output, "detach") else np.asarray(output)
        if output.ndim == array.ndim + 1:  # channels: argmax unless one channel of labels
            output = output[0] if output.shape[0] == 1 else output.argmax(axis=0)
        labels = np.rint(output).astype(np.int64)
        if labels.shape != array.shape:
            from skimage.transform import resize

            labels = resize(labels, array.shape, order=0, preserve_range=True,
                            anti_aliasing=False).astype(np.int64)
        return np.clip(labels, 0, 65535)

    def analyse_image(self, image: ImageInput, maps_dir: Path | None,
                      times: StageTimes) -> TaskResult:
        info = image.info
        pixels = image.decoded.pixels
        grey = pixels.mean(axis=-1) if pixels.shape[-1] == 3 else pixels[..., 0]
        with times.stage(self.task.name):
            labels = np.stack([self._labels(frame) for frame in grey])
        spacing = (info.spacing.row_mm, info.spacing.column_mm) if info.spacing else None
        stats = label_stats(labels, self.task.labels, pixel_mm=spacing)
        maps_file = (write_label_map(maps_dir, f"{info.ref.sop_instance_uid}_{self.task.name}",
                                     labels) if maps_dir is not None and stats else None)
        reading = LabelMapReading(task=self.task.name, model=self.model_ref, labels=stats,
                                  maps_file=maps_file)
        log_reading(self.task.name, info, stats, self.model_ref)
        return TaskResult([info.model_copy(update={"analyses": [*info.analyses, reading]})])

    def analyse_series(self, volume: SeriesVolume, maps_dir: Path | None,
                       times: StageTimes) -> TaskResult:
        import torch

        array = np.asarray(volume.volume.array, dtype=np.float32)
        if array.ndim == 4:  # colour: grey
            array = array.mean(axis=-1)
        with times.stage(self.task.name):
            labels = self._labels(array, affine=torch.as_tensor(volume.volume.affine))
        stats = label_stats(labels, self.task.labels, voxel_mm=volume.spacing_mm)
        series = volume.infos[0].ref.series_instance_uid
        maps_file = (write_label_map(maps_dir, f"{series}_{self.task.name}", labels,
                                     volume.sources)
                     if maps_dir is not None and stats else None)
        reading = LabelMapReading(task=self.task.name, model=self.model_ref, labels=stats,
                                  maps_file=maps_file, volume=series)
        return TaskResult([info.model_copy(update={"analyses": [*info.analyses, reading]})
                           for info in volume.infos])
