"""Where the model stage runs: in the worker's own process (``compute.backend: local``), or in
Ray actors that keep the model warm (``ray``), shared by every worker of a cluster.

The model stage of a batch of frames is inference plus the saliency of the frames that need it
(those with a lesion, or all), in one call: saliency reuses the forward pass's autograd graph,
which cannot leave the process that ran it. What comes back is plain arrays: each frame's
prediction, the saliency maps by row, and the seconds each part took.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from radlens.analysis.lesions import find_lesions
from radlens.errors import ComputeUnavailableError, RadlensError
from radlens.logs import kv

if TYPE_CHECKING:
    from radlens.config import ComputeSettings, ModelSettings
    from radlens.tasks.breast_us.infer import Prediction, Segmenter
    from radlens.tasks.breast_us.saliency import SaliencyExplainer, SaliencyMap

log = logging.getLogger(__name__)

Explain = Literal["lesions", "all"] | None
RESTART_WAIT_S = 120.0  # how long a call waits for a restarting model actor


@dataclass
class StageBatch:
    """One batch through the model stage."""

    predictions: list[Prediction]
    maps: dict[int, list[SaliencyMap]]  # by row of the batch: the frames explained
    seconds: dict[str, float] = field(default_factory=dict)  # "inference", "saliency"


class LocalModelStage:
    """The model stage in this process."""

    def __init__(self, segmenter: Segmenter, explainer: SaliencyExplainer | None) -> None:
        self.segmenter = segmenter
        self.explainer = explainer

    def step(self, methods: Sequence[str], explain: Explain) -> int:
        """Frames per call: a batch whose pass keeps Grad-CAM's graph may be smaller."""
        if explain and self.explainer is not None and self.explainer.pass_layer(methods):
            return self.explainer.graph_batch
        return self.segmenter.batch_size

    def analyse(self, frames: Sequence[np.ndarray], *, explain: Explain,
                methods: Sequence[str], min_lesion_pixels: int, abstain: bool) -> StageBatch:
        """Predictions for ``frames``, and the saliency of those to explain now: every frame
        (``all``) or those with a lesion (``lesions``), never one the model abstains on."""
        started = time.perf_counter()
        layer = (self.explainer.pass_layer(methods)
                 if explain and methods and self.explainer is not None else None)
        forward = self.segmenter.predict_batch(frames, cam_layer=layer)
        seconds = {"inference": time.perf_counter() - started}
        maps: dict[int, list[SaliencyMap]] = {}
        if explain and methods and self.explainer is not None:
            detector = self.segmenter.ood if abstain else None
            rows = [row for row, prediction in enumerate(forward.predictions)
                    if _explained(prediction, explain, min_lesion_pixels, detector)]
            started = time.perf_counter()
            sizes = [tuple(np.asarray(frames[row]).shape[:2]) for row in rows]
            explained = self.explainer.explain_pass(forward, rows, sizes, list(methods))
            maps = dict(zip(rows, explained, strict=True))
            seconds["saliency"] = time.perf_counter() - started
        return StageBatch(forward.predictions, maps, seconds)

    def explain(self, frames: Sequence[np.ndarray], methods: Sequence[str]
                ) -> list[list[SaliencyMap]]:
        """Saliency of frames chosen once a whole clip was seen, from passes of their own."""
        if self.explainer is None:
            return [[] for _ in frames]
        return self.explainer.explain_batch(list(frames), list(methods))


def _explained(prediction: Prediction, explain: Explain, min_lesion_pixels: int,
               detector: Any) -> bool:
    if detector is not None and float(detector.score(prediction.latent)[0]) > detector.threshold:
        return False  # abstained: no finding, so nothing to explain
    return explain == "all" or bool(find_lesions(prediction.classes,
                                                 min_pixels=min_lesion_pixels))


def load_segmenter(model: ModelSettings, *, device: str | None = None) -> Segmenter:
    """The configured model, loaded as the model stage runs it: freed batches given back to
    the OS, torch on ``model.threads`` threads, on ``device`` (default ``model.device``).
    Raises ModelError (or ValueError) when it cannot be loaded."""
    from radlens.memory import cap_mmap_threshold
    from radlens.tasks.breast_us.infer import Segmenter

    cap_mmap_threshold()  # a clip's batches give their memory back (radlens.memory)
    if model.threads:
        import torch

        torch.set_num_threads(model.threads)
    return Segmenter(model.weights, version=model.version, device=device or model.device,
                     batch_size=model.batch_size)


class ModelActor:
    """A Ray actor holding one warm model: the model stage for any worker that calls it."""

    def __init__(self, model: dict[str, Any]) -> None:
        from radlens.config import ModelSettings
        from radlens.tasks.breast_us.saliency import SaliencyExplainer

        segmenter = load_segmenter(ModelSettings.model_validate(model))
        self.stage = LocalModelStage(segmenter, SaliencyExplainer(segmenter))

    def pid(self) -> int:
        import os

        return os.getpid()

    def analyse(self, frames: list[np.ndarray], explain: Explain, methods: list[str],
                min_lesion_pixels: int, abstain: bool) -> StageBatch:
        return self.stage.analyse(frames, explain=explain, methods=methods,
                                  min_lesion_pixels=min_lesion_pixels, abstain=abstain)

    def explain(self, frames: list[np.ndarray], methods: list[str]) -> list[list[SaliencyMap]]:
        return self.stage.explain(frames, methods)


class RayModelStage:
    """The model stage in Ray actors: ``compute.actors`` of them, each with
    ``compute.gpus_per_actor`` GPUs (fractions share one) or on the CPU. They are named after
    the model, detached and restarted when they die, so every worker of a cluster shares the
    same warm ones. A call to an actor that dies fails like any error of the job, which is
    then retried."""

    def __init__(self, compute: ComputeSettings, model: ModelSettings, *, name: str,
                 version: str) -> None:
        try:
            import ray
        except ModuleNotFoundError as exc:
            raise RadlensError("compute.backend ray needs Ray: pip install 'radlens[ray]'"
                               ) from exc
        self._ray = ray
        self.restart_wait_s = RESTART_WAIT_S
        self.batch_size = model.batch_size
        if not ray.is_initialized():
            # Ray's driver takes over SIGTERM (it exits at once); the agent's own handler,
            # which stops the stages in order, must stay in charge.
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            ray.init(address=compute.ray_address or "auto", namespace=compute.ray_namespace,
                     log_to_driver=False, logging_level=logging.WARNING)
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        options: dict[str, Any] = {"num_gpus": compute.gpus_per_actor,
                                   "num_cpus": compute.cpus_per_actor,
                                   "max_restarts": -1, "max_task_retries": 0,
                                   "lifetime": "detached", "get_if_exists": True}
        actor_class = ray.remote(ModelActor)
        self.actors = [
            actor_class.options(name=f"radlens-model-{name}-{version}-{index}", **options)
            .remote(model.model_dump(mode="json"))
            for index in range(compute.actors)]
        self._turn = itertools.cycle(range(len(self.actors)))
        self._turn_lock = threading.Lock()
        log.info("model stage on Ray", extra=kv(address=compute.ray_address or "auto",
                                                actors=compute.actors,
                                                gpus_per_actor=compute.gpus_per_actor))

    def _actor(self) -> Any:
        with self._turn_lock:
            return self.actors[next(self._turn)]

    def step(self, methods: Sequence[str], explain: Explain) -> int:
        return self.batch_size

    def analyse(self, frames: Sequence[np.ndarray], *, explain: Explain,
                methods: Sequence[str], min_lesion_pixels: int, abstain: bool) -> StageBatch:
        return self._call("analyse", list(frames), explain, list(methods), min_lesion_pixels,
                          abstain)

    def explain(self, frames: Sequence[np.ndarray], methods: Sequence[str]
                ) -> list[list[SaliencyMap]]:
        return self._call("explain", list(frames), list(methods))

    def _call(self, method: str, *args: Any) -> Any:
        """One call to the next actor. An actor or a cluster that fails is the job's problem,
        not the image's: ComputeUnavailableError, and the job runs again."""
        from ray import exceptions

        actor = self._actor()
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            try:
                return self._ray.get(getattr(actor, method).remote(*args))
            except exceptions.ActorUnavailableError as exc:
                # Restarting (Ray brings a dead actor back, loading the model takes seconds):
                # wait for it rather than fail the job at once.
                if time.monotonic() > deadline:
                    raise ComputeUnavailableError(
                        f"the model actor did not come back within {self.restart_wait_s:.0f} s"
                    ) from exc
                log.info("model actor restarting; waiting", extra=kv(method=method))
                time.sleep(1.0)
            except (exceptions.RayActorError, exceptions.RaySystemError,
                    exceptions.ObjectLostError, exceptions.GetTimeoutError) as exc:
                log.warning("model actor failed", extra=kv(method=method,
                                                           error=type(exc).__name__))
                raise ComputeUnavailableError(f"the model stage on Ray failed: "
                                              f"{type(exc).__name__}: {exc}"[:500]) from exc
