"""Typed configuration: defaults here, then a YAML file, then RADLENS_* environment variables.

The models below are the single source of the defaults; ``default.yaml`` beside this file documents
them for users (a unit test keeps the two equal).
"""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from radlens.errors import ConfigError
from radlens.models.scope import ModelScope
from radlens.tasks.labels import LabelDefinition

CONFIG_ENV_VAR = "RADLENS_CONFIG"


def _check_ae_title(value: str) -> str:
    """An AE title is 1-16 characters of the default repertoire, no backslash, not all spaces."""
    if not value.strip():
        raise ValueError("an AE title cannot be empty or all spaces")
    if len(value) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {value!r} has {len(value)}")
    if "\\" in value or any(ord(ch) < 32 or ord(ch) > 126 for ch in value):
        raise ValueError(f"an AE title holds printable ASCII without backslash, not {value!r}")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
Network = Annotated[IPv4Network | IPv6Network, Field(union_mode="left_to_right")]


# The names configurations gave the two built-in models before they became tasks.
LEGACY_MODEL_TASKS = {"default": "breast_us", "density": "mammo_density"}
LEGACY_DELIVERY_TASKS = {"lesions": "breast_us", "density": "mammo_density"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TlsSettings(_Section):
    """DICOM TLS (the BCP 195 profile: TLS 1.2 or 1.3, ECDHE with AES-GCM): a listener on its
    own port, and the identity and trust this node uses towards destinations with ``tls``.
    Off while no certificate is set."""

    port: Port = 2762
    certificate: Path | None = None  # PEM, this node's certificate (chain)
    private_key: Path | None = None  # PEM, unencrypted
    ca_certificates: Path | None = None  # PEM bundle: who signs the peers we trust
    require_client_certificate: bool = True  # refuse senders without a certificate we trust
    only: bool = False  # serve TLS only: no plain DICOM port

    @property
    def enabled(self) -> bool:
        return self.certificate is not None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together: give both or neither")
        if self.only and not self.enabled:
            raise ValueError("only: TLS-only needs a certificate and private_key")
        if self.enabled and self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA that "
                             "signs the senders' certificates), or set it to false")
        return self


class Peer(_Section):
    """A calling AE title bound to the addresses it may call from, with its own limit."""

    ae_title: AETitle
    addresses: list[Network] = Field(default_factory=list)  # CIDR, e.g. 10.1.2.0/24; empty: any
    max_associations: int | None = Field(default=None, ge=1, le=1000)  # at once; empty: no own cap
    # The peer's own Storage SCP, where results go back when a delivery rule names "sender".
    return_host: str | None = None
    return_port: Port | None = None

    @model_validator(mode="after")
    def _return_address_whole(self) -> Peer:
        if (self.return_host is None) != (self.return_port is None):
            raise ValueError("return_host and return_port go together")
        return self


class DicomSettings(_Section):
    """The DICOM listener."""

    ae_title: AETitle = "RADLENS"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)
    max_associations: int = Field(default=16, ge=1, le=1000)
    # processes serving the port (SO_REUSEPORT), apart from the agent's own (with
    # worker.isolation: thread, the agent serves it and starts listener_processes - 1 more)
    listener_processes: int = Field(default=1, ge=1, le=64)
    max_pdu_size: int = Field(default=1_048_576, ge=0)
    tcp_nodelay: bool = True
    network_timeout_s: float = Field(default=60.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # one source address may hold this many connections at once (0: no cap beyond
    # max_associations); a sender that opens connections and never speaks cannot take them all
    max_connections_per_address: int = Field(default=8, ge=0, le=1000)
    # an instance larger than this is refused (0xA700) and nothing of it is kept; 0: no cap
    max_instance_mb: int = Field(default=2048, ge=0)
    peers: list[Peer] = Field(default_factory=list)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @model_validator(mode="after")
    def _peers_unique(self) -> DicomSettings:
        titles = [p.ae_title for p in self.peers]
        repeated = sorted({t for t in titles if titles.count(t) > 1})
        if repeated:
            raise ValueError(f"peers: each AE title once, repeated: {', '.join(repeated)}")
        if self.tls.enabled and not self.tls.only and self.tls.port == self.port:
            raise ValueError(f"tls.port ({self.tls.port}) is the plain port too: choose another "
                             "port, or set tls.only to serve TLS alone")
        return self


class StorageSettings(_Section):
    """Where received instances, results and the SQLite state (by default) live."""

    data_dir: Path = Path("radlens-data")
    fsync: bool = True
    min_free_mb: int = Field(default=200, ge=0)


class StateSettings(_Section):
    """Where the state lives (instances, jobs, outbox, analyses): by default a SQLite file in
    the data folder; ``postgresql://user:password@host:port/database`` for a cluster."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if not value:
            return None
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(f"state.url must be sqlite:/// or postgresql://, not {scheme}://")
        return value

    def resolved_url(self, data_dir: Path) -> str:
        """The SQLAlchemy URL of the state for an agent on ``data_dir``."""
        from radlens.db import state_url

        return state_url(self.url, data_dir)


class ClusterSettings(_Section):
    """Several nodes on one state (``radlens serve --role``): how long a node holds a job or an
    outbox row without renewing it, how often it says it is alive, how often workers look for
    complete studies."""

    lease_s: float = Field(default=60.0, gt=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    sweep_interval_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> ClusterSettings:
        if self.heartbeat_interval_s * 3 > self.lease_s:
            raise ValueError(f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at "
                             f"most a third of lease_s ({self.lease_s}): a live node must renew "
                             "its leases before they run out")
        return self


class ComputeSettings(_Section):
    """Where the model stage runs: in the worker (``local``), or in Ray actors that keep the
    model warm and that every worker of a cluster shares (``ray``)."""

    backend: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # host:port of the Ray head; empty: RAY_ADDRESS or "auto"
    ray_namespace: str = "radlens"
    actors: int = Field(default=1, ge=1, le=256)
    gpus_per_actor: float = Field(default=0.0, ge=0)  # 0: CPU actors; 0.5: two share a GPU
    cpus_per_actor: float = Field(default=1.0, ge=0)


class MetricsSettings(_Section):
    """``/healthz`` and Prometheus ``/metrics`` of this node over HTTP; off without a port."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)


class AssemblySettings(_Section):
    """When a study counts as complete: quiet for ``quiet_period_s``, or open for ``max_wait_s``."""

    quiet_period_s: float = Field(default=15.0, gt=0)
    max_wait_s: float = Field(default=600.0, gt=0)
    # An instance sent again byte for byte after its study was analysed (a sender re-sending
    # what it was not sure had arrived, after a crash or a timeout): ignore it, or analyse the
    # study again as a new revision. A changed instance always makes a new revision.
    identical_resend: Literal["ignore", "reprocess"] = "ignore"
    # A study found pending when the agent starts (its transfer was cut by the stop or a
    # crash) waits at least this long for its senders to reconnect and re-send the rest.
    recovery_wait_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _max_wait_covers_quiet_period(self) -> AssemblySettings:
        if self.max_wait_s < self.quiet_period_s:
            raise ValueError(
                f"max_wait_s ({self.max_wait_s}) must be at least quiet_period_s "
                f"({self.quiet_period_s})"
            )
        return self


class JobSettings(_Section):
    """Study jobs: a job that fails (a bug, not a bad image) is retried, then reported failed."""

    max_attempts: int = Field(default=3, ge=1, le=20)


def _machine_memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError):  # no sysconf (not POSIX): a figure that fits laptops
        return 8192


class WorkerSettings(_Section):
    """The worker that runs jobs: how many studies may be in flight at once, and the limits
    one study runs under, so that no study can take the node down."""

    # Studies in flight at once. With isolation: process, that many worker processes, each
    # with the models loaded (about 0.7 GB each on the CPU); with thread, a study's writers run
    # while the next study is in the model. 0: one per two CPU cores and per 4 GB of memory,
    # between 1 and 4 (see ``processes``).
    concurrency: int = Field(default=0, ge=0, le=4)
    # process: each job runs in a worker process of its own, apart from the listener and the
    # sender, killed when it passes max_memory_mb or job_timeout_s (that attempt fails, the
    # node goes on). thread: in the agent's own process (no limit can be enforced).
    isolation: Literal["process", "thread"] = "process"
    # Resident memory one worker process may use; empty: half the machine's memory shared
    # among the worker processes.
    max_memory_mb: int | None = Field(default=None, ge=256)
    job_timeout_s: float = Field(default=900.0, gt=0)  # one attempt of one job, start to end
    # Free space a job needs on the data folder's disk to start (results are about 20 times
    # their input); with less, jobs wait queued and radlens status says why.
    min_free_mb: int = Field(default=500, ge=0)

    def processes(self) -> int:
        """``concurrency``, or with 0 one per two cores and per 4 GB, from 1 to 4: a small
        machine runs one study at a time (one process already uses every core for the model)
        and keeps its memory, a large one overlaps studies."""
        if self.concurrency:
            return self.concurrency
        cores = os.cpu_count() or 1
        return max(1, min(4, cores // 2, _machine_memory_mb() // 4096))

    def memory_limit_mb(self) -> int:
        """``max_memory_mb``, or half the machine's memory shared among the workers."""
        if self.max_memory_mb is not None:
            return self.max_memory_mb
        return max(1024, _machine_memory_mb() // 2 // self.processes())


OutputName = Literal["seg", "sr", "parametric_map", "overlay", "pdf", "rejection", "sources"]
RESULT_OUTPUTS: tuple[OutputName, ...] = ("seg", "sr", "parametric_map", "overlay", "pdf",
                                          "rejection")


class Destination(_Section):
    """A DICOM node that receives what radlens sends (results, forwarded instances)."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: str
    port: Port
    # DICOM TLS to this destination: its certificate is checked against tls_ca_certificates
    # (default: dicom.tls.ca_certificates) and this node shows dicom.tls.certificate
    tls: bool = False
    tls_ca_certificates: Path | None = None
    tls_check_hostname: bool = True  # the certificate must name ``host``
    # What it gets of each study: the result objects by kind ("rejection": the note that
    # withdraws a superseded revision), and with "sources" the study's received instances.
    outputs: list[OutputName] = Field(default_factory=lambda: list(RESULT_OUTPUTS))


def sender_destination(ae_title: str) -> str:
    """The destination name of a peer's return address."""
    return "sender-" + re.sub(r"[^A-Za-z0-9_.-]", "_", ae_title.strip())[:56]


class DeliveryRule(_Section):
    """Which destinations a study's outputs go to, chosen on its source. Every condition set
    must hold; the first rule that matches decides."""

    name: str = Field(min_length=1, max_length=64)
    calling_aet: AETitle | None = None  # the AE title the study arrived from
    modality: str | None = None  # a modality of the study's instances, e.g. US
    study_description: str | None = None  # a regular expression searched, any case
    # what ran on the study: a task's name (radlens models lists them: the task read an image
    # of it), or "none" (no task read anything)
    task: str | None = None
    destinations: list[str] = Field(min_length=1)  # names, or "sender" (the calling AE's
    # return address, dicom.peers[].return_host/return_port)

    @field_validator("task")
    @classmethod
    def _legacy_task(cls, value: str | None) -> str | None:
        """"lesions" and "density", as rules named the two models' work before tasks."""
        return LEGACY_DELIVERY_TASKS.get(value, value) if value is not None else None

    @field_validator("study_description")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"study_description is not a regular expression: {exc}"
                                 ) from exc
        return value


class DeliverySettings(_Section):
    """Where each study's outputs go (see ``radlens route``)."""

    rules: list[DeliveryRule] = Field(default_factory=list)
    unmatched: Literal["all", "none"] = "all"  # no rule matched: every destination, or none


class RetentionSettings(_Section):
    """What the node removes, and when, so that it can be left running: a study's received
    instances and results once it is finished (no instance waiting, no job queued or running,
    no output undelivered), the quarantine, and the state's rows of long-finished jobs. Days may
    be fractions; empty keeps forever."""

    spool_days: float | None = Field(default=30.0, ge=0)  # received instances
    results_days: float | None = Field(default=30.0, ge=0)  # findings, maps, DICOM outputs
    quarantine_days: float | None = Field(default=30.0, ge=0)
    # Rows of finished jobs (their analyses, deliveries and instances), quarantine records and
    # stopped nodes. The cohort analysis reads the analyses: keep them as long as it needs.
    state_days: float | None = Field(default=365.0, ge=0)
    # What tasks remember of a patient's studies for the change since a prior visit (a
    # lesion's ABC(D) and probability): follow-up intervals are months to years.
    history_days: float | None = Field(default=1100.0, ge=0)
    # A budget for the data folder: past it, or with less than keep_free_mb free on its disk,
    # the sweep removes finished studies (received instances, then results), oldest first,
    # whatever their age.
    max_disk_mb: int | None = Field(default=None, ge=1)
    keep_free_mb: int = Field(default=1024, ge=0)
    interval_s: float = Field(default=3600.0, gt=0)  # the full sweep
    # How often the free space and the budget are checked; a shortfall sweeps at once.
    check_interval_s: float = Field(default=30.0, gt=0)


class OutboxSettings(_Section):
    """Delivery to destinations: how often to look, and how to back off while one is down."""

    poll_interval_s: float = Field(default=2.0, gt=0)
    retry_initial_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    # An outage (no connection, a timeout, Out of Resources) is retried with back-off until
    # max_attempts (0: no count) or max_age_h after the file was queued (0: no age); a refusal
    # (SOP class not supported, a data set the peer cannot take) fails at once.
    max_attempts: int = Field(default=0, ge=0)
    max_age_h: float = Field(default=72.0, ge=0)
    calling_ae_title: AETitle | None = None


class ModelSettings(_Section):
    """The segmentation model the pipeline runs on every usable image."""

    enabled: bool = True
    weights: str = "default"  # a shipped model's name, or a weights folder (model.pt + card.json)
    version: str | None = None  # when set, the card's version must match
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=8, ge=1, le=256)
    # CPU threads for the model (0: torch's default, one per core). Several workers on one
    # machine each take their share (cores / workers) instead of all contending for all.
    threads: int = Field(default=0, ge=0, le=1024)
    max_frames: int = Field(default=0, ge=0, description="frames analysed per image; 0 = all")
    min_lesion_pixels: int = Field(default=20, ge=1)
    saliency: list[Literal["gradcam", "gradcam++", "occlusion", "prototype"]] = Field(
        default_factory=lambda: ["prototype", "gradcam++"])
    abstain: bool = True  # frames unlike the training images (OOD score > threshold) get no finding
    # which frames get saliency: "lesions" (frames with a lesion; on a clip with none, its most
    # suspicious frame), "all", or a number N (the N most suspicious frames, lesions first)
    explain_frames: Literal["lesions", "all"] | Annotated[int, Field(ge=1)] = "lesions"


class DensitySettings(_Section):
    """The breast density model the pipeline runs on mammograms (MG), beside the lesion model."""

    enabled: bool = True
    weights: str = "density"  # a shipped model's name, or a folder with model.pt + card.json
    version: str | None = None  # when set, the card's version must match
    abstain: bool = True  # a mammogram unlike the training images gets no category
    # Below this share of Grad-CAM mass on breast tissue, the reading carries an
    # attention-on-artifact warning in the findings, the SR and the report.
    low_tissue_share: float = Field(default=0.6, ge=0, le=1)


class PriorVisitSettings(_Section):
    """How a photograph's lesion is matched with the same lesion in the patient's earlier
    studies, for the change since the prior visit (docs/dermoscopy.md). The patient is the
    Patient ID and its issuer; the lesion is what ``match_on`` names, read from the header:
    ``site`` (the anatomic region's meaning), ``laterality`` (Laterality or ImageLaterality)
    and ``lesion_id`` (the first group of ``lesion_id_pattern`` in ``lesion_id_attribute``).
    A photograph whose header lacks its site or identifier is not compared; no side is a
    value of its own (the back and the abdomen have none)."""

    enabled: bool = True
    match_on: list[Literal["site", "laterality", "lesion_id"]] = Field(
        default_factory=lambda: ["site", "laterality", "lesion_id"], min_length=1)
    lesion_id_attribute: str = "SeriesDescription"
    lesion_id_pattern: str = r"\blesion\s+(\w+)"

    @field_validator("lesion_id_attribute")
    @classmethod
    def _keyword(cls, value: str) -> str:
        from pydicom.datadict import tag_for_keyword

        if tag_for_keyword(value) is None:
            raise ValueError(f"{value!r} is not a DICOM attribute keyword")
        return value

    @field_validator("lesion_id_pattern")
    @classmethod
    def _one_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"lesion_id_pattern is not a regular expression: {exc}") from exc
        if compiled.groups != 1:
            raise ValueError(f"lesion_id_pattern must hold one group (the identifier), not "
                             f"{compiled.groups}")
        return value


class DermoscopySettings(_Section):
    """The melanoma model on dermoscopic photographs (DMS, or XC as older systems send them).
    Off until a model is trained or shipped: radlens has its phantoms and features so far."""

    enabled: bool = False
    weights: str = "dermoscopy"  # a shipped model's name, or a folder with model.pt + card.json
    version: str | None = None  # when set, the card's version must match
    abstain: bool = True  # a photograph unlike the training images gets no reading
    # A SAM2 checkpoint folder (the sam2 extra) as the mask refiner; None: the random walker.
    sam2: Path | None = None
    prior: PriorVisitSettings = Field(default_factory=PriorVisitSettings)


class BundleSettings(_Section):
    """A MONAI bundle folder run as a task (docs/tasks.md). A bundle's configs instantiate the
    Python objects they name: a bundle is code, and only those listed here are loaded."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")  # the task's name (rules, findings)
    path: Path  # the folder: configs/metadata.json, configs/inference.json, models/model.pt
    # What it reads, as a model card states it: radlens cannot guess a bundle's body part.
    scope: ModelScope
    unit: Literal["image", "series"] = "image"  # each image's frames, or a series as a volume
    input_key: str = "image"
    output_key: str = "pred"
    # Labels when the metadata's channel_def names none: [{value: 1, name: spleen, code:
    # {value: "78961009", scheme: SCT, meaning: Spleen}}]
    labels: list[LabelDefinition] = Field(default_factory=list)
    enabled: bool = True


class RoutingRule(_Section):
    """One routing rule: every criterion given must hold; the first rule that matches decides."""

    name: str | None = None
    calling_ae: AETitle | None = None
    modality: str | None = None
    body_part: str | None = None  # BodyPartExamined, e.g. BREAST
    anatomic_region: str | None = None  # SNOMED CT code value in AnatomicRegionSequence
    description: str | None = None  # regular expression over Study and Series Description
    # The tasks that read a matching image (radlens models lists them), or "none": no task.
    # Unset: the tasks in scope whose anatomy the header states (all of them if it states none).
    task: str | list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_model(cls, data: Any) -> Any:
        """``model: default|density|none``, as rules named the two models before tasks."""
        if isinstance(data, dict) and "model" in data:
            data = dict(data)
            legacy = data.pop("model")
            if "task" not in data and legacy is not None:
                data["task"] = LEGACY_MODEL_TASKS.get(str(legacy), str(legacy))
        return data

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names the rule sends to (empty for ``none``), or None: any in scope."""
        if self.task is None:
            return None
        names = [self.task] if isinstance(self.task, str) else list(self.task)
        return tuple(name for name in names if name != "none")

    @model_validator(mode="after")
    def _valid_pattern(self) -> RoutingRule:
        from radlens.models.scope import check_description_pattern

        check_description_pattern(self.description)
        return self


class RoutingSettings(_Section):
    """Which images the model sees when their header does not say (see radlens route)."""

    rules: list[RoutingRule] = Field(default_factory=list)
    unstated_body_part: Literal["analyse", "skip"] = "analyse"


class OutputSettings(_Section):
    """Which DICOM objects each job writes next to findings.json and sends to every destination."""

    seg: bool = True  # lesion segmentation (SEG), one segment per lesion class
    sr: bool = True  # TID 1500 measurement report with the narrative
    parametric_map: bool = True  # the first saliency method as a Parametric Map
    overlay: bool = True  # RGB Secondary Capture: image, heat map, lesion contours
    pdf: bool = True  # the report as Encapsulated PDF (and results/<Study>/report.pdf)
    # When a study is analysed again (revision N+1), a Key Object Selection "Rejected for
    # Quality Reasons" (IHE IOCM) withdraws revision N's objects at the destinations that got them.
    retract_superseded: bool = True


class AnatomySettings(_Section):
    """A label map of named structures on the image grid (docs/method.md): lesions and saliency
    masks are reported with the structures they overlap."""

    label_map: Path | None = None  # NIfTI, one frame on the image grid
    names: Path | None = None  # CSV with columns label,name

    @model_validator(mode="after")
    def _both_or_neither(self) -> AnatomySettings:
        if (self.label_map is None) != (self.names is None):
            raise ValueError("label_map and names go together: give both or neither")
        return self


class CohortSettings(_Section):
    """Re-running the cohort analysis over the agent's data on a schedule."""

    schedule: str | None = None  # crontab, e.g. "0 2 * * *" for 02:00 every night (UTC)
    latent: Literal["image", "lesion"] = "image"

    @model_validator(mode="after")
    def _valid_crontab(self) -> CohortSettings:
        if self.schedule is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.schedule)
            except ValueError as exc:
                raise ValueError(f"schedule {self.schedule!r} is not a crontab: {exc}") from None
        return self


class LlmSettings(_Section):
    """Who writes the narrative: the deterministic template, or a local LLM through Ollama."""

    provider: Literal["template", "ollama"] = "template"
    host: str = "http://127.0.0.1:11434"  # Ollama's address; keep it on this machine
    model: str = "llama3.1:8b"  # a model pulled into that Ollama (e.g. a MedGemma build)
    timeout_s: float = Field(default=60.0, gt=0, description="longest wait for the narrative "
                             "before the template text goes out")
    keep_alive: str = "10m"  # how long Ollama keeps the model loaded after a request
    seed: int = 0
    vision: bool = False  # also send the saliency overlay (only to a vision-capable model)


class AuditSettings(_Section):
    """The audit trail: one JSON object a line, DICOM audit events (associations, instances
    in and out, security alerts, queries and exports), UIDs but never patient names."""

    path: Path | None = None  # empty: audit.jsonl in the data folder
    syslog: str | None = None  # also send each event as RFC 5424: udp://host:514 or tcp://host:601

    @field_validator("syslog")
    @classmethod
    def _syslog_address(cls, value: str | None) -> str | None:
        if not value:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname or not parts.port:
            raise ValueError(f"syslog is udp://host:port or tcp://host:port, not {value!r}")
        return value

    def resolved_path(self, data_dir: Path) -> Path:
        return self.path if self.path is not None else data_dir / "audit.jsonl"


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """Everything radlens reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="RADLENS_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    destinations: list[Destination] = Field(default_factory=list)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    density: DensitySettings = Field(default_factory=DensitySettings)
    dermoscopy: DermoscopySettings = Field(default_factory=DermoscopySettings)
    bundles: list[BundleSettings] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    anatomy: AnatomySettings = Field(default_factory=AnatomySettings)
    cohort: CohortSettings = Field(default_factory=CohortSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _destination_names_unique(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(duplicates)}")
        for rule in self.delivery.rules:
            unknown = sorted(set(rule.destinations) - set(names) - {"sender"})
            if unknown:
                raise ValueError(f"delivery rule {rule.name!r} names unknown destinations: "
                                 f"{', '.join(unknown)}")
        return self

    # The YAML file is chosen at run time, so the sources are built per load (see load_settings).
    _yaml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_file))
        return tuple(sources)

    def delivery_destinations(self) -> list[Destination]:
        """The destinations, and each peer's return address as ``sender-<AE>`` (the outbox
        sends to any of them)."""
        returns = [Destination(name=sender_destination(peer.ae_title),
                               ae_title=peer.ae_title, host=peer.return_host,
                               port=peer.return_port)
                   for peer in self.dicom.peers
                   if peer.return_host is not None and peer.return_port is not None]
        return [*self.destinations, *returns]

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise ConfigError(f"unknown destination {name!r} (known: {known})")


def _describe(error: ValidationError) -> str:
    """One line naming the first invalid field and why."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    value = first.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    more = len(error.errors()) - 1
    suffix = f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else ""
    return f"{location}: {message}{shown}{suffix}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load the effective settings, or raise ConfigError with one readable line.

    ``config_file`` falls back to the RADLENS_CONFIG environment variable.
    """
    if config_file is None and os.environ.get(CONFIG_ENV_VAR):
        config_file = Path(os.environ[CONFIG_ENV_VAR])
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {str(config_file)!r} does not exist")
        try:
            import yaml

            content = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {str(config_file)!r} is not valid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"config file {str(config_file)!r} must hold a mapping at the top")

    class _Loaded(Settings):
        _yaml_file = config_file

    try:
        loaded = _Loaded(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    return Settings.model_validate(loaded.model_dump())
