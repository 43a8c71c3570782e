"""The ``radlens`` command. Errors: one line on stderr, exit 2 for usage/config, 1 for failure."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from radlens import __version__
from radlens.config import Settings, load_settings
from radlens.errors import ConfigError, RadlensError
from radlens.logs import configure_logging

app = typer.Typer(
    name="radlens",
    help="A DICOM node that explains what it sees. Research use only, not for diagnostic use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (default: built-in defaults; "
                 "RADLENS_CONFIG and RADLENS_* variables also apply).",
                 dir_okay=False),
]
LogFormatOption = Annotated[
    str | None, typer.Option("--log-format", help="text or json (overrides log.format)")]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"radlens: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings(config: Path | None, log_format: str | None = None, *,
              client: bool = False) -> Settings:
    try:
        settings = load_settings(config)
        if log_format is not None:
            settings.log.format = log_format  # type: ignore[assignment]
    except ConfigError as exc:
        raise _fail(f"config error: {exc}", 2) from None
    except ValueError as exc:  # validate_assignment on --log-format
        raise _fail(f"config error: log.format: {exc.errors()[0]['msg']}", 2) from None  # type: ignore[attr-defined]
    configure_logging(settings.log.level, settings.log.format, quiet_network=client)
    return settings


@app.command()
def serve(config: ConfigOption = None, log_format: LogFormatOption = None) -> None:
    """Run the agent: the DICOM listener, study assembly, the worker and the outbox."""
    from radlens.agent.service import Agent

    settings = _settings(config, log_format)
    try:
        Agent(settings).run_until_signalled()
    except OSError as exc:
        raise _fail(f"cannot start: {exc}", 1) from None
    except RadlensError as exc:
        raise _fail(str(exc), 1) from None


@app.command()
def echo(
    host: Annotated[str, typer.Argument(help="host of the remote node")],
    port: Annotated[int, typer.Argument(help="its DICOM port")],
    aet: Annotated[str, typer.Argument(help="its AE title (called AE)")],
    calling_aet: Annotated[str | None, typer.Option(help="our AE title (default dicom.ae_title)")]
    = None,
    timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
    config: ConfigOption = None,
) -> None:
    """Send a C-ECHO to a DICOM node."""
    from radlens.dicom_io.scu import echo as send_echo

    settings = _settings(config, client=True)
    started = time.perf_counter()
    try:
        status = send_echo(host, port, aet, calling_aet=calling_aet or settings.dicom.ae_title,
                           timeout_s=timeout)
    except RadlensError as exc:
        raise _fail(f"C-ECHO failed: {exc}", 1) from None
    elapsed_ms = (time.perf_counter() - started) * 1000
    if status != 0:
        raise _fail(f"C-ECHO to {aet}@{host}:{port} answered 0x{status:04X}", 1)
    console.print(f"C-ECHO to {aet}@{host}:{port}: Success in {elapsed_ms:.0f} ms")


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Counts of instances, studies, jobs and deliveries, whether the agent runs or not."""
    from radlens.agent.status import collect_status

    settings = _settings(config)
    report = collect_status(settings.storage.data_dir)
    if as_json:
        console.print_json(report.model_dump_json())
        return
    agent = report.agent
    running = (f"[green]running[/] pid {agent.pid}, {agent.ae_title}@{agent.host}:{agent.port}"
               if agent.running else "[yellow]not running[/]")
    console.print(f"radlens {__version__}  agent: {running}")
    console.print(f"data: {report.data_dir}")
    last = (datetime.fromtimestamp(report.last_received_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if report.last_received_at else "never")
    table = Table(title="received", show_header=False)
    table.add_row("instances", f"{report.instances} ({report.instance_bytes / 2**20:.1f} MiB)")
    table.add_row("studies", str(report.studies))
    table.add_row("waiting for study completion", str(report.pending_instances))
    table.add_row("quarantined", str(report.quarantined))
    table.add_row("last received", last)
    console.print(table)
    jobs = Table(title="jobs")
    for state in report.jobs:
        jobs.add_column(state, justify="right")
    jobs.add_row(*(str(n) for n in report.jobs.values()))
    console.print(jobs)
    deliveries = Table(title="outbox")
    deliveries.add_column("destination")
    for state in ("pending", "sent", "failed"):
        deliveries.add_column(state, justify="right")
    for name, counts in report.outbox.items():
        deliveries.add_row(name, *(str(counts.get(s, 0)) for s in ("pending", "sent", "failed")))
    if report.outbox:
        console.print(deliveries)
    else:
        console.print("outbox: nothing queued")
    for failure in report.recent_failures:
        console.print(f"[red]job {failure['id']} failed[/]: {failure['error']}", highlight=False)
    if report.llm is not None:
        colour = "green" if report.llm.ready else "yellow"
        console.print(f"narrative: [{colour}]{report.llm.provider}[/] - ", end="")
        console.print(report.llm.message, markup=False, highlight=False, soft_wrap=True)


@app.command()
def forward(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    to: Annotated[str, typer.Option("--to", help="destination name from the configuration")],
    config: ConfigOption = None,
) -> None:
    """Queue DICOM files for a destination; the running agent delivers them, with retries."""
    from radlens.agent.outbox import Outbox
    from radlens.db import DB_FILENAME, Database

    settings = _settings(config, client=True)
    files = sorted(p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))
                   if p.is_file())
    data_dir = settings.storage.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(data_dir / DB_FILENAME, durable=settings.storage.fsync)
    outbox = Outbox(db, settings.outbox, settings.destinations, calling_aet=settings.dicom.ae_title)
    try:
        ids = outbox.enqueue(files, to)
    except ConfigError as exc:
        raise _fail(f"config error: {exc}", 2) from None
    except RadlensError as exc:
        raise _fail(str(exc), 1) from None
    finally:
        db.close()
    console.print(f"queued {len(ids)} file(s) for {to}")


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option(help="folder to write images/, masks/, labels.csv")],
    n: Annotated[int, typer.Option(min=1, help="number of cases")] = 100,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    size: Annotated[int, typer.Option(min=64, max=2048, help="frame size in pixels")] = 256,
    dicom: Annotated[bool, typer.Option("--dicom", help="also one DICOM study per case")]
    = False,
    config: ConfigOption = None,
) -> None:
    """Write synthetic breast-ultrasound phantoms in the BUS-UCLM folder layout."""
    from rich.progress import Progress

    from radlens.models.phantoms import Phantom, generate, write_dataset

    _settings(config)
    counts: dict[str, int] = {}
    with Progress(console=err, transient=False) as progress:
        task = progress.add_task("phantoms", total=n)

        def advance(phantom: Phantom) -> None:
            counts[phantom.label] = counts.get(phantom.label, 0) + 1
            progress.advance(task)

        write_dataset(out, generate(n, seed, size=size), dicom=dicom,
                      uid_seed=f"radlens-phantoms-{seed}-{size}", on_case=advance)
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("normal", "benign", "malignant"))
    out.mkdir(parents=True, exist_ok=True)
    console_line = f"wrote {n} phantoms ({summary}) to {out}"
    if dicom:
        console_line += f"; DICOM studies in {out / 'dicom'}"
    sys.stdout.write(console_line + "\n")


@app.command()
def models() -> None:
    """The registered architectures with their parameter counts, and the shipped models."""
    from radlens.models.infer import WEIGHTS_DIR
    from radlens.models.networks import REGISTRY, parameter_count

    table = Table(title="architectures")
    for column in ("name", "parameters", "size (float32)", "encoder depths", "description"):
        table.add_column(column, justify="right" if column in ("parameters", "size (float32)",
                                                               "encoder depths") else "left")
    for name, architecture in REGISTRY.items():
        network = architecture.build(1)
        count = parameter_count(network)
        table.add_row(name, f"{count:,}", f"{count * 4 / 2**20:.1f} MiB", str(network.depth),
                      architecture.description)
    console.print(table)
    for card_path in sorted(WEIGHTS_DIR.glob("*/card.json")):
        card = json.loads(card_path.read_text())
        console.print(f"shipped: {card_path.parent.name} = {card['name']} {card['version']} "
                  f"({card['architecture']})", highlight=False)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="dataset folder: images/, masks/ [labels.csv]",
                                       exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="where model.pt, card, metrics and curves go")],
    arch: Annotated[str, typer.Option(help="architecture (see radlens models)")] = "unet",
    folds: Annotated[int, typer.Option(min=0, help="k-fold cross-validation (0: one split)")]
    = 0,
    epochs: Annotated[int, typer.Option(min=1)] = 100,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    learning_rate: Annotated[float, typer.Option()] = 1e-4,
    patience: Annotated[int, typer.Option(min=1, help="early stopping patience (epochs)")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
    size: Annotated[int, typer.Option(min=32, help="network input size")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="data-loading processes")] = 0,
    config: ConfigOption = None,
) -> None:
    """Train a segmentation network with the science.md settings."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from radlens.models.datasets import DatasetError
    from radlens.models.networks import REGISTRY
    from radlens.models.train import EpochRecord, TrainSettings, run_training

    _settings(config)
    if arch not in REGISTRY:
        raise _fail(f"unknown architecture {arch!r} (known: {', '.join(REGISTRY)})", 2)
    settings = TrainSettings(arch=arch, epochs=epochs, batch_size=batch_size,
                             learning_rate=learning_rate, patience=patience, folds=folds,
                             seed=seed, device=device, size=size, workers=workers)
    command = "radlens " + " ".join(sys.argv[1:])
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err) as progress:
        tasks: dict[int, int] = {}

        def on_epoch(fold: int, record: EpochRecord, planned: int) -> None:
            if fold not in tasks:
                tasks[fold] = progress.add_task(f"{arch} fold {fold}", total=planned, info="")
            dice = record.val_lesion_dice
            progress.update(tasks[fold], completed=record.epoch,
                            info=f"loss {record.train_loss:.3f} / {record.val_loss:.3f}  "
                                 f"lesion Dice " + (f"{dice:.3f}" if dice is not None else "n/a"))

        try:
            metrics = run_training(data, settings, out, command=command, on_epoch=on_epoch)
        except (DatasetError, ValueError) as exc:
            raise _fail(str(exc), 1) from None
    summary = metrics["summary"]
    dice = summary["lesion_dice"]["mean"]
    console.print(f"trained {arch} on {metrics['data']['cases']} cases; validation lesion Dice "
              f"{dice:.3f}; image accuracy "
              f"{summary['from_segmentation']['accuracy']['mean']:.3f}; wrote {out}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="dataset folder with masks", exists=True,
                                       file_okay=False)],
    out: Annotated[Path, typer.Option(help="where report.json and report.md go")],
    model: Annotated[str, typer.Option(help="weights folder or shipped model name")]
    = "default",
    compare: Annotated[str | None, typer.Option(
        help="train these architectures (comma-separated) under identical settings and "
             "compare them instead")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="epochs per architecture with --compare")]
    = 100,
    folds: Annotated[int, typer.Option(min=0, help="folds per architecture with --compare")]
    = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    config: ConfigOption = None,
) -> None:
    """Evaluate a model on a labelled dataset, or compare architectures trained identically."""
    from radlens.models import evaluate as evaluation
    from radlens.models.datasets import DatasetError

    _settings(config)
    try:
        if compare:
            evaluation.compare_architectures(
                data, [a.strip() for a in compare.split(",") if a.strip()], out,
                epochs=epochs, folds=folds, device=device, seed=seed)
        else:
            evaluation.evaluate_folder(data, model, out, device=device, seed=seed)
    except (DatasetError, ValueError, RadlensError) as exc:
        raise _fail(str(exc), 1) from None
    console.print((out / "report.md").read_text(), markup=False, highlight=False)


@app.command()
def cohort(
    out: Annotated[Path, typer.Option(help="where cohort.json, cohort.md and the t-SNE go")],
    data: Annotated[Path | None, typer.Option(
        help="dataset folder with masks (images/, masks/)", exists=True, file_okay=False)]
    = None,
    from_agent: Annotated[bool, typer.Option(
        "--from-agent", help="everything the agent processed (storage.data_dir)")] = False,
    latent: Annotated[str, typer.Option(help="with --from-agent: image or lesion")] = "image",
    model: Annotated[str, typer.Option(help="weights folder or shipped model name")]
    = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    config: ConfigOption = None,
) -> None:
    """Latent probing: cluster the encoder latents nine ways, score, draw, tabulate."""
    from rich.progress import Progress

    from radlens.analysis.cohort import analyse_agent, analyse_dataset
    from radlens.models.datasets import DatasetError

    settings = _settings(config)
    if (data is None) == (not from_agent):
        raise _fail("give either --data DIR or --from-agent", 2)
    with Progress(console=err) as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        try:
            if from_agent:
                report = analyse_agent(settings.storage.data_dir, out, latent=latent,
                                       seed=seed, on_progress=on_progress)
            else:
                assert data is not None
                report = analyse_dataset(data, out, model=model, device=device, seed=seed,
                                         on_progress=on_progress)
        except (DatasetError, ValueError, RadlensError) as exc:
            raise _fail(str(exc), 1) from None
    from radlens.reporting.cohort_report import REPORT_FILE, write_cohort_report

    narrative = write_cohort_report(out, report, settings.llm,
                                    vision_capable=_llm_takes_images(settings))
    console.print((out / "cohort.md").read_text(), markup=False, highlight=False)
    console.print(narrative.text, markup=False, highlight=False)
    console.print(f"written by {narrative.author_line}; report: {out / REPORT_FILE}",
                  markup=False, highlight=False)


def _llm_takes_images(settings: Settings) -> bool:
    if settings.llm.provider != "ollama" or not settings.llm.vision:
        return False
    from radlens.reporting.ollama import OllamaNarrator

    return OllamaNarrator(settings.llm).status().vision


@app.command()
def process(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders", exists=True)],
    out: Annotated[Path, typer.Option(help="results/<StudyUID>/ go here")],
    config: ConfigOption = None,
) -> None:
    """Run the agent's pipeline on files or folders, without the network: findings.json, SEG,
    SR, saliency map and overlay per study, as `radlens serve` writes them."""
    from rich.progress import Progress

    from radlens.agent.offline import collect_studies, process_study
    from radlens.agent.service import load_analyser

    settings = _settings(config)
    try:
        analyser = load_analyser(settings)
    except RadlensError as exc:
        raise _fail(str(exc), 1) from None
    if analyser is None:
        raise _fail("model.enabled is false: nothing to process", 2)
    studies, unreadable = collect_studies(paths)
    table = Table(title="processed")
    for column in ("study", "revision", "lesions", "SEG", "SR", "maps", "overlays"):
        table.add_column(column)
    with Progress(console=err) as progress:
        task = progress.add_task("studies", total=len(studies))
        for study_uid, instances in studies.items():
            done = process_study(study_uid, instances, out / "results", analyser, settings)
            table.add_row(study_uid, str(done.revision), str(done.lesions),
                          str(len(done.outputs.seg)), str(len(done.outputs.sr)),
                          str(len(done.outputs.parametric_map)), str(len(done.outputs.overlay)))
            progress.advance(task)
    console.print(table)
    for item in unreadable:
        err.print(f"skipped {item.path}: {item.reason}", markup=False, highlight=False)
    if not studies:
        raise _fail("no DICOM study found in the given paths", 1)


@app.command("export-nifti")
def export_nifti(
    results: Annotated[Path, typer.Argument(help="a study's results folder "
                                            "(<data>/results/<StudyInstanceUID>)",
                                            exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="where the .nii.gz files go")],
    config: ConfigOption = None,
) -> None:
    """Write a processed study's class maps, probabilities and saliency maps as NIfTI."""
    from radlens.analysis.nifti import export_study

    _settings(config)
    if not (results / "findings.json").is_file():
        raise _fail(f"{results} holds no findings.json", 1)
    written = export_study(results, out)
    console.print(f"wrote {len(written)} NIfTI file(s) to {out}")


@config_app.command("show")
def config_show(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False,
) -> None:
    """Print the effective configuration (defaults, file and environment merged)."""
    settings = _settings(config)
    data = settings.model_dump(mode="json")
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@app.command()
def version() -> None:
    """Print the radlens version."""
    console.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
