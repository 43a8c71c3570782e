"""The research commands: phantoms, models, train, evaluate, cohort, export-nifti.

Registered on the ``radlens`` app by ``radlens.cli``; kept apart so the agent's commands and the
research pipeline's each stay readable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from radlens.cli_support import ConfigOption, audit_command, cli_settings, console, err, fail
from radlens.config import Settings
from radlens.errors import RadlensError

# The names --kind and --task took before each model became a task.
LEGACY_TASK_NAMES = {"us": "breast_us", "mammo": "mammo_density",
                     "segmentation": "breast_us", "density": "mammo_density"}


class _Bars:
    """A task's progress, drawn as rich progress bars on stderr."""

    def __init__(self, progress: Any) -> None:
        self.progress, self.bars = progress, {}

    def start(self, key: str, label: str, total: int) -> None:
        self.bars[key] = self.progress.add_task(label, total=total, info="")

    def update(self, key: str, completed: int, info: str = "") -> None:
        if key in self.bars:
            self.progress.update(self.bars[key], completed=completed, info=info)


LAYOUT_HELP = ("the dataset's layout (breast_us: colour, class-index, binary, nifti, nnunet, "
               "dicom-seg; "
               "docs/research.md); unset: the one the folder shows, refused when it could be "
               "read two ways")


def _task(name: str) -> Any:
    """The task ``--task`` names (its older names accepted), or a usage error."""
    from radlens.tasks.base import TaskError
    from radlens.tasks.registry import get_task

    try:
        return get_task(LEGACY_TASK_NAMES.get(name, name))
    except TaskError as exc:
        raise fail(str(exc), 2) from None


def _bars() -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)


def phantoms(
    out: Annotated[Path, typer.Option(help="folder to write images/, masks/ (or regions/), "
                                      "labels.csv")],
    n: Annotated[int, typer.Option(min=1, help="number of cases (mammo_density: of patients, "
                                   "four views each)")] = 100,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    size: Annotated[int, typer.Option(min=64, max=2048, help="frame size in pixels "
                                      "(mammo_density: the height)")] = 256,
    task: Annotated[str | None, typer.Option(
        help="the task whose phantoms to write (radlens models lists them): breast_us, "
             "breast ultrasound with lesions; mammo_density, mammograms with a BI-RADS "
             "density category; dermoscopy, nevi and melanomas")] = None,
    kind: Annotated[str | None, typer.Option(help="the older name of --task: us or mammo")]
    = None,
    dicom: Annotated[bool, typer.Option("--dicom", help="also one DICOM study per case "
                                        "(mammo_density: per patient)")] = False,
    tomosynthesis: Annotated[bool, typer.Option(
        "--tomosynthesis", help="mammo_density, with --dicom: also a Breast Tomosynthesis "
        "volume per view, as a combined 2D and 3D examination")] = False,
    visits: Annotated[int, typer.Option(
        min=1, max=12, help="dermoscopy: each lesion seen on this many visits six months "
        "apart (a melanoma grows between them, a nevus does not)")] = 1,
    config: ConfigOption = None,
) -> None:
    """Write seeded synthetic phantoms of a task: breast ultrasound in the BUS-UCLM folder
    layout, mammograms (CC and MLO, left and right) labelled with their breast density, or
    dermoscopic photographs of nevi and melanomas with masks and their true descriptors."""
    from radlens.tasks.base import TaskError

    cli_settings(config)
    chosen = _task(task or kind or "breast_us")
    with _bars() as progress:
        try:
            line = chosen.write_phantoms(out, n=n, seed=seed, size=size, dicom=dicom,
                                         options={"tomosynthesis": tomosynthesis,
                                                  "visits": visits},
                                         progress=_Bars(progress))
        except TaskError as exc:
            raise fail(str(exc), 1) from None
    out.mkdir(parents=True, exist_ok=True)
    if dicom:
        line += f"; DICOM studies in {out / 'dicom'}"
    sys.stdout.write(line + "\n")


models_app = typer.Typer(help="Every task this installation has (built-in, from installed "
                          "packages, configured MONAI bundles) with its model, scope and origin; "
                          "the registered architectures; the shipped models. `radlens models "
                          "verify` checks weights against their cards' hashes.")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Every task this installation has (built-in, from installed packages, configured MONAI
    bundles) with its model, scope and origin; the registered architectures with their
    parameter counts; and the shipped models."""
    if ctx.invoked_subcommand is not None:
        return
    from radlens.models.cards import shipped_models
    from radlens.models.networks import REGISTRY, parameter_count
    from radlens.models.scope import ImageGeometry
    from radlens.tasks.base import TaskError
    from radlens.tasks.registry import all_tasks, configure, problems

    settings = cli_settings(config)
    try:
        configure(settings)
    except TaskError as exc:
        raise fail(str(exc), 1) from None
    tasks = Table(title="tasks")
    for column in ("task", "origin", "model", "reads", "scope", "enabled"):
        tasks.add_column(column, overflow="fold")
    for task in all_tasks():
        try:
            card = task.card(settings)
            scope = task.scope(settings)
        except Exception as exc:  # a card that cannot be read: say so, list the rest
            card, scope = {"name": f"(card unreadable: {exc})", "version": ""}, None
        reads = {"image": "each image", "series": "a series as a volume",
                 "study": "the study's images"}[task.unit]
        described = "states no scope"
        if scope is not None:
            described = (f"{', '.join(scope.modalities)} {', '.join(scope.body_parts)}"
                         + (f"; {scope.geometry.describe()}" if scope.geometry else "")
                         + (f"; series {scope.series.describe()}" if scope.series else ""))
        tasks.add_row(task.name, task.origin, f"{card.get('name')} {card.get('version')}",
                      reads, described, "yes" if task.enabled(settings) else "no")
    console.print(tasks)
    for problem in problems():
        err.print(problem, highlight=False)
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
    for name, folder in shipped_models().items():
        card = json.loads((folder / "card.json").read_text())
        console.print(f"shipped: {name} = {card['name']} {card['version']} "
                      f"({card['architecture']})", highlight=False)
        scope = card.get("scope")
        if scope:
            geometry = (f"; {ImageGeometry.model_validate(scope['geometry']).describe()}"
                        if scope.get("geometry") else "")
            console.print(f"  scope: {', '.join(scope['modalities'])} "
                          f"{', '.join(scope['body_parts'])}{geometry}", highlight=False)


@models_app.command("verify")
def models_verify(
    models: Annotated[list[str] | None, typer.Argument(
        help="weights folders or shipped model names (default: every shipped model)")] = None,
) -> None:
    """Check each model's weights files against the SHA-256 its card recorded when it was
    trained: a changed, missing or unlisted file is named, and the exit status is 1."""
    from radlens.models.cards import ModelError, model_folder, shipped_models, verify

    names = models or list(shipped_models())
    failed = False
    for name in names:
        try:
            folder = model_folder(name)
            problems = verify(folder)
        except ModelError as exc:
            problems, folder = [str(exc)], Path(name)
        failed = failed or bool(problems)
        if problems:
            for problem in problems:
                err.print(f"{name}: {problem}", highlight=False, markup=False,
                          soft_wrap=True)
        else:
            console.print(f"{name}: every weights file matches its card ({folder})",
                          highlight=False, markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def export(
    out: Annotated[Path, typer.Option(help="the TorchScript file to write (model.ts)")],
    model: Annotated[str, typer.Option(help="weights folder or shipped model name")]
    = "default",
    task: Annotated[str, typer.Option(help="the task whose network to export (radlens models "
                                      "lists them)")] = "breast_us",
) -> None:
    """Export a task's trained network as TorchScript, with its card embedded (card.json),
    for sites that serve models outside radlens; the saved file is loaded back and must give
    the same output."""
    from radlens.models.cards import ModelError
    from radlens.tasks.base import TaskError

    chosen = _task(task)
    try:
        line = chosen.export(model, out)
    except (TaskError, ModelError, ValueError) as exc:
        raise fail(str(exc), 1) from None
    console.print(line, highlight=False, markup=False, soft_wrap=True)


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
    size: Annotated[int | None, typer.Option(
        min=32, help="network input size (default 256; density: 224)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    workers: Annotated[int, typer.Option(min=0, help="data-loading processes")] = 0,
    task: Annotated[str, typer.Option(
        help="the task whose model to train (radlens models lists them): breast_us, "
             "breast-ultrasound lesions; mammo_density, BI-RADS breast density on mammograms "
             "(docs/mammo_density.md); dermoscopy, melanoma with ABC features "
             "(docs/dermoscopy.md)")] = "breast_us",
    class_weights: Annotated[bool, typer.Option(
        "--class-weights/--no-class-weights",
        help="density: inverse-frequency weights and undersampling (off: the ablation)")]
    = True,
    test: Annotated[Path | None, typer.Option(
        help="density: a folder of fresh cases; the model's figures on it go into its card",
        exists=True, file_okay=False)] = None,
    ablation: Annotated[bool, typer.Option(
        "--ablation", help="density, with --test: also train without class weights; "
        "dermoscopy: also without the alignment loss; the card records its figures")] = False,
    layout: Annotated[str | None, typer.Option(help=LAYOUT_HELP)] = None,
    test_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.5, help="share of patients held out first as the test set, reported "
        "only (0: none)")] = 0.2,
    segmenter_epochs: Annotated[int | None, typer.Option(
        min=1, help="dermoscopy: the coarse UNet's epochs (default: --epochs)")] = None,
    alignment_weight: Annotated[float | None, typer.Option(
        min=0.0, help="dermoscopy: the weight of the NT-Xent alignment loss beside the "
        "classification's (default 1; 0 trains without it)")] = None,
    alignment_temperature: Annotated[float | None, typer.Option(
        min=0.01, max=1.0, help="dermoscopy: NT-Xent's temperature (default 0.1; higher asks "
        "more of the positive pairs' similarity)")] = None,
    aspect: Annotated[str, typer.Option(
        help="lesions: how an image that is not square becomes the square input: pad (keep "
             "its aspect ratio, black borders) or stretch (docs/breast_us.md)")] = "pad",
    clip: Annotated[Path | None, typer.Option(
        help="density: fine-tune your own CLIP weights (an open_clip folder such as "
             "BiomedCLIP's: open_clip_config.json and the weights) instead of radlens's "
             "encoders; needs radlens[clip]", exists=True, file_okay=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Train a task's model (radlens models lists the tasks): the lesion network with the
    published settings (docs/method.md), the breast density model (--task mammo_density,
    docs/mammo_density.md) or the melanoma model (--task dermoscopy, docs/dermoscopy.md)."""
    from radlens.tasks.base import TaskError, TaskUsageError, TrainRequest

    cli_settings(config)
    chosen = _task(task)
    request = TrainRequest(
        data=data, out=out, folds=folds, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, patience=patience, seed=seed, size=size, device=device,
        command="radlens " + " ".join(sys.argv[1:]),
        options={"arch": arch, "workers": workers, "class_weights": class_weights,
                 "test": test, "ablation": ablation, "clip": clip, "layout": layout,
                 "test_fraction": test_fraction, "aspect": aspect,
                 "segmenter_epochs": segmenter_epochs, "alignment_weight": alignment_weight,
                 "alignment_temperature": alignment_temperature})
    with _bars() as progress:
        try:
            summary = chosen.train(request, _Bars(progress))
        except TaskError as exc:
            raise fail(str(exc), 2 if isinstance(exc, TaskUsageError) else 1) from None
    for line in summary.splitlines():
        console.print(line, highlight=False)


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
    unlike: Annotated[list[Path] | None, typer.Option(
        help="DICOM files or folders the model should abstain on: their out-of-distribution "
             "scores are printed beside the dataset's")] = None,
    task: Annotated[str, typer.Option(help="the task whose model to evaluate: breast_us or "
                                      "mammo_density (radlens models lists them)")]
    = "breast_us",
    layout: Annotated[str | None, typer.Option(help=LAYOUT_HELP)] = None,
    config: ConfigOption = None,
) -> None:
    """Evaluate a task's model on a labelled dataset (the lesion model: segmentation and
    classification, or compare architectures trained identically; --task mammo_density:
    accuracy, per-category AUC and the confusion matrix; --task dermoscopy: accuracy, AUC,
    masks by class and confounder, pair similarities, descriptor precision)."""
    from radlens.tasks.base import TaskError

    cli_settings(config)
    chosen = _task(task)
    options = {"compare": compare, "epochs": epochs, "folds": folds, "layout": layout,
               "unlike": unlike_frames(unlike) if unlike else None}
    try:
        report = chosen.evaluate(data, model, out, device=device, seed=seed, options=options)
    except TaskError as exc:
        raise fail(str(exc), 1) from None
    console.print(report.read_text(), markup=False, highlight=False)


def calibrate_ood(
    fit: Annotated[Path, typer.Option(help="phantom/dataset folder of the training "
                                           "distribution the detector is fitted on",
                                      exists=True, file_okay=False)],
    calibration: Annotated[Path, typer.Option(help="held-out folder of the same distribution "
                                                   "that sets the threshold",
                                              exists=True, file_okay=False)],
    model: Annotated[str, typer.Option(help="weights folder or shipped model name")]
    = "default",
    quantile: Annotated[float, typer.Option(min=0.5, max=0.999, help="share of held-out "
                                            "images that must pass")] = 0.99,
    unlike: Annotated[list[Path] | None, typer.Option(
        help="DICOM files or folders the model must abstain on (measured into the card)")]
    = None,
    version: Annotated[str | None, typer.Option(help="new card version (weights unchanged)")]
    = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Fit a model's out-of-distribution detector and threshold (ood.npz, card.json) and state
    the breast-ultrasound scope in its card, without retraining the weights."""
    from radlens.models.cards import rehash
    from radlens.models.ood import calibrate, case_images, summary
    from radlens.tasks.breast_us.datasets import DatasetError, load_cases
    from radlens.tasks.breast_us.infer import Segmenter
    from radlens.tasks.breast_us.scope import BREAST_ULTRASOUND_SCOPE
    from radlens.tasks.breast_us.train import write_card

    try:
        segmenter = Segmenter(model, device=device)
        fit_cases, calibration_cases = load_cases(fit), load_cases(calibration)
    except (DatasetError, RadlensError, RuntimeError) as exc:
        raise fail(str(exc), 1) from None
    detector, section = calibrate(
        segmenter, case_images(fit_cases), case_images(calibration_cases), quantile=quantile,
        described={"fit_on": str(fit), "calibrated_on": str(calibration)})
    if unlike:
        frames = unlike_frames(unlike)
        section["measured"] = {
            f"{name} (must abstain)": summary(detector.score(segmenter.latents(images)),
                                              detector.threshold)
            for name, images in frames.items()}
    card = segmenter.card
    card["ood"] = section
    card.setdefault("scope", BREAST_ULTRASOUND_SCOPE)
    card["intended_use"] = card["scope"]["intended_use"]
    if version:
        card["version"] = version
    write_card(rehash(card, segmenter.folder), segmenter.folder)
    console.print(f"threshold {detector.threshold:.2f} (quantile {quantile}); held-out abstain "
                  f"rate {section['calibration']['abstain_rate']:.3f}")
    for name, measured in (section.get("measured") or {}).items():
        console.print(f"{name}: {measured['n']} frames, abstain rate "
                      f"{measured['abstain_rate']:.3f}, median {measured['median']:.1f}")


def unlike_frames(paths: list[Path]) -> dict[str, list]:
    """Every frame of every decodable DICOM image under ``paths``, by file name."""
    from radlens.agent.offline import iter_files
    from radlens.dicom_io.pixels import decode_file
    from radlens.errors import UnsupportedImageError

    frames: dict[str, list] = {}
    for path in iter_files(paths):
        try:
            decoded = decode_file(path)
        except UnsupportedImageError:
            continue
        frames[path.name] = list(decoded.pixels)
    return frames


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
    from radlens.tasks.breast_us.datasets import DatasetError

    settings = cli_settings(config)
    if (data is None) == (not from_agent):
        raise fail("give either --data DIR or --from-agent", 2)
    with Progress(console=err) as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        try:
            if from_agent:
                report = analyse_agent(settings.state.resolved_url(settings.storage.data_dir),
                                       out, latent=latent, seed=seed, on_progress=on_progress)
            else:
                assert data is not None
                report = analyse_dataset(data, out, model=model, device=device, seed=seed,
                                         on_progress=on_progress)
        except (DatasetError, ValueError, RadlensError) as exc:
            raise fail(str(exc), 1) from None
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


dataset_app = typer.Typer(help="Your own labelled folders: what radlens reads in them, before "
                                "anything trains on them (docs/research.md).",
                           no_args_is_help=True)


@dataset_app.command("check")
def dataset_check(
    data: Annotated[Path, typer.Argument(help="the dataset folder", exists=True,
                                         file_okay=False)],
    task: Annotated[str, typer.Option(help="the task whose training would read it "
                                      "(radlens models lists them)")] = "breast_us",
    layout: Annotated[str | None, typer.Option(help=LAYOUT_HELP)] = None,
) -> None:
    """Read a labelled folder exactly as training and evaluation will, and print what is in
    it: its layout and why, cases and patients, each label's count, the mask values, the
    pixels per class, image sizes and pixel spacings. A folder that cannot be read without
    guessing is refused with the files and the readings that compete (exit status 1)."""
    from radlens.tasks.base import TaskError, TaskUsageError

    chosen = _task(task)
    try:
        summary = chosen.check_dataset(data, layout=layout)
    except TaskError as exc:
        raise fail(str(exc), 2 if isinstance(exc, TaskUsageError) else 1) from None
    console.print(f"{summary.folder}: {summary.cases} cases of {summary.patients} patients, "
                  f"layout {summary.layout} ({summary.how})", highlight=False, markup=False,
                  soft_wrap=True)
    console.print(f"\nlabels ({chosen.name})", highlight=False)
    labels = Table()
    for name in summary.labels:
        labels.add_column(name, justify="right")
    labels.add_row(*(str(count) for count in summary.labels.values()))
    console.print(labels)
    for title, counts in summary.tables.items():
        console.print(f"\n{title}", highlight=False)
        table = Table()
        table.add_column("value")
        table.add_column("count", justify="right")
        for key, count in counts.items():
            table.add_row(key, f"{count:,}")
        console.print(table)
    for note in summary.notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)


def export_nifti(
    results: Annotated[Path, typer.Argument(help="a study's results folder "
                                            "(<data>/results/<StudyInstanceUID>)",
                                            exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option(help="where the .nii.gz files go")],
    config: ConfigOption = None,
) -> None:
    """Write a processed study's class maps, probabilities and saliency maps as NIfTI."""
    from radlens.analysis.nifti import export_study

    settings = cli_settings(config)
    if not (results / "findings.json").is_file():
        raise fail(f"{results} holds no findings.json", 1)
    written = export_study(results, out)
    audit_command(settings, "export", command="radlens export-nifti", study=results.name,
                  count=len(written), path=str(out.resolve()))
    console.print(f"wrote {len(written)} NIfTI file(s) to {out}")
