"""The research commands: phantoms, models, train, evaluate, cohort, export-nifti.

Registered on the ``radlens`` app by ``radlens.cli``; kept apart so the agent's commands and the
research pipeline's each stay readable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from radlens.cli_support import ConfigOption, audit_command, cli_settings, console, err, fail
from radlens.config import Settings
from radlens.errors import RadlensError


def phantoms(
    out: Annotated[Path, typer.Option(help="folder to write images/, masks/ (or regions/), "
                                      "labels.csv")],
    n: Annotated[int, typer.Option(min=1, help="number of cases (mammo: of patients, four "
                                   "views each)")] = 100,
    seed: Annotated[int, typer.Option(help="same seed, same bytes")] = 0,
    size: Annotated[int, typer.Option(min=64, max=2048, help="frame size in pixels (mammo: "
                                      "the height)")] = 256,
    kind: Annotated[str, typer.Option(help="us: breast ultrasound with lesions; mammo: "
                                      "mammograms with a BI-RADS density category")] = "us",
    dicom: Annotated[bool, typer.Option("--dicom", help="also one DICOM study per case "
                                        "(mammo: per patient)")] = False,
    tomosynthesis: Annotated[bool, typer.Option(
        "--tomosynthesis", help="mammo, with --dicom: also a Breast Tomosynthesis volume per "
        "view, as a combined 2D and 3D examination")] = False,
    config: ConfigOption = None,
) -> None:
    """Write synthetic phantoms: breast ultrasound in the BUS-UCLM folder layout, or
    mammograms (CC and MLO, left and right) labelled with their breast density."""
    from rich.progress import Progress

    cli_settings(config)
    if kind not in ("us", "mammo"):
        raise fail(f"--kind is us or mammo, not {kind!r}", 2)
    counts: dict[str, int] = {}
    with Progress(console=err, transient=False) as progress:
        task = progress.add_task("phantoms", total=n)
        if kind == "mammo":
            from radlens.tasks.mammo_density import phantoms as mammo_phantoms

            def advance_patient(views: list) -> None:
                category = mammo_phantoms.study_density(views)
                counts[category] = counts.get(category, 0) + 1
                progress.advance(task)

            mammo_phantoms.write_dataset(out, mammo_phantoms.generate(n, seed, size=size),
                                         dicom=dicom, uid_seed=f"radlens-mammo-{seed}-{size}",
                                         tomosynthesis=tomosynthesis,
                                         on_patient=advance_patient)
        else:
            from radlens.tasks.breast_us.phantoms import Phantom, generate, write_dataset

            def advance(phantom: Phantom) -> None:
                counts[phantom.label] = counts.get(phantom.label, 0) + 1
                progress.advance(task)

            write_dataset(out, generate(n, seed, size=size), dicom=dicom,
                          uid_seed=f"radlens-phantoms-{seed}-{size}", on_case=advance)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "mammo":
        summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in "ABCD")
        console_line = (f"wrote {n} patients, {4 * n} views (study density: {summary}) "
                        f"to {out}")
    else:
        summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("normal", "benign",
                                                               "malignant"))
        console_line = f"wrote {n} phantoms ({summary}) to {out}"
    if dicom:
        console_line += f"; DICOM studies in {out / 'dicom'}"
    sys.stdout.write(console_line + "\n")


def models() -> None:
    """The registered architectures with their parameter counts, and the shipped models."""
    from radlens.models.cards import WEIGHTS_DIR
    from radlens.models.networks import REGISTRY, parameter_count
    from radlens.models.scope import ImageGeometry

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
        scope = card.get("scope")
        if scope:
            geometry = (f"; {ImageGeometry.model_validate(scope['geometry']).describe()}"
                        if scope.get("geometry") else "")
            console.print(f"  scope: {', '.join(scope['modalities'])} "
                          f"{', '.join(scope['body_parts'])}{geometry}", highlight=False)


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
        help="segmentation: breast-ultrasound lesions; density: BI-RADS breast density on "
             "mammograms (docs/density.md)")] = "segmentation",
    class_weights: Annotated[bool, typer.Option(
        "--class-weights/--no-class-weights",
        help="density: inverse-frequency weights and undersampling (off: the ablation)")]
    = True,
    test: Annotated[Path | None, typer.Option(
        help="density: a folder of fresh cases; the model's figures on it go into its card",
        exists=True, file_okay=False)] = None,
    ablation: Annotated[bool, typer.Option(
        "--ablation", help="density, with --test: also train without class weights and "
        "record its figures in the card")] = False,
    clip: Annotated[Path | None, typer.Option(
        help="density: fine-tune your own CLIP weights (an open_clip folder such as "
             "BiomedCLIP's: open_clip_config.json and the weights) instead of radlens's "
             "encoders; needs radlens[clip]", exists=True, file_okay=False)] = None,
    config: ConfigOption = None,
) -> None:
    """Train a segmentation network with the published settings (docs/method.md), or the
    breast density model (--task density)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from radlens.models.networks import REGISTRY
    from radlens.tasks.breast_us.datasets import DatasetError
    from radlens.tasks.breast_us.train import EpochRecord, TrainSettings, run_training

    cli_settings(config)
    if task == "density":
        train_density(data, out, folds=folds, epochs=epochs, batch_size=batch_size,
                      learning_rate=learning_rate, patience=patience, seed=seed,
                      size=size or 224, device=device, weighted=class_weights, test=test,
                      ablation=ablation, clip=clip)
        return
    if task != "segmentation":
        raise fail(f"--task is segmentation or density, not {task!r}", 2)
    size = size or 256
    if arch not in REGISTRY:
        raise fail(f"unknown architecture {arch!r} (known: {', '.join(REGISTRY)})", 2)
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
            raise fail(str(exc), 1) from None
    summary = metrics["summary"]
    dice = summary["lesion_dice"]["mean"]
    console.print(f"trained {arch} on {metrics['data']['cases']} cases; validation lesion Dice "
              f"{dice:.3f}; image accuracy "
              f"{summary['from_segmentation']['accuracy']['mean']:.3f}; wrote {out}")


def train_density(data: Path, out: Path, *, folds: int, epochs: int, batch_size: int,
                  learning_rate: float, patience: int, seed: int, size: int, device: str,
                  weighted: bool, test: Path | None = None, ablation: bool = False,
                  clip: Path | None = None) -> None:
    """``radlens train --task density``: folds with a progress bar each, then the summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from radlens.tasks.mammo_density.train import (
        DensityDataError,
        DensityEpoch,
        DensityTrainSettings,
        run_density_training,
    )

    settings = DensityTrainSettings(epochs=epochs, batch_size=batch_size,
                                    learning_rate=learning_rate, patience=patience,
                                    folds=folds, seed=seed, device=device, size=size,
                                    weighted=weighted, clip=str(clip) if clip else None)
    if clip is not None:
        from radlens.tasks.mammo_density.clip_backbone import ClipUnavailableError, load_open_clip

        try:
            load_open_clip(clip)  # fail before the first fold, with the reason
        except ClipUnavailableError as exc:
            raise fail(str(exc), 1) from None
    command = "radlens " + " ".join(sys.argv[1:])
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err) as progress:
        tasks: dict[int, int] = {}

        def on_epoch(fold: int, record: DensityEpoch, planned: int) -> None:
            if fold not in tasks:
                tasks[fold] = progress.add_task(f"density fold {fold}", total=planned,
                                                info="")
            progress.update(tasks[fold], completed=record.epoch,
                            info=f"loss {record.train_loss:.3f} / {record.val_loss:.3f}  "
                                 f"accuracy {record.val_accuracy:.3f}")

        try:
            metrics = run_density_training(data, settings, out, command=command,
                                           on_epoch=on_epoch, test=test, ablation=ablation)
        except (DensityDataError, ValueError) as exc:
            raise fail(str(exc), 1) from None
    summary = metrics["summary"]
    console.print(f"trained the density model on {metrics['data']['views']} views of "
                  f"{metrics['data']['patients']} patients; validation accuracy "
                  f"{summary['accuracy']['mean']:.3f}, mean AUC "
                  f"{summary['mean_auc']['mean']:.3f}; wrote {out}", highlight=False)
    for label, figures in (("fresh cases", metrics.get("test")),
                           ("without class weights",
                            (metrics.get("ablation") or {}).get("without_class_weights"))):
        if figures:
            aucs = ", ".join(f"{k} {v:.3f}" for k, v in figures["auc"].items() if v is not None)
            console.print(f"{label}: accuracy {figures['accuracy']:.3f}; AUC {aucs}",
                          highlight=False)


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
    task: Annotated[str, typer.Option(help="segmentation or density")] = "segmentation",
    config: ConfigOption = None,
) -> None:
    """Evaluate a model on a labelled dataset, or compare architectures trained identically;
    with --task density: accuracy, per-category AUC and the confusion matrix."""
    from radlens.tasks.breast_us import evaluate as evaluation
    from radlens.tasks.breast_us.datasets import DatasetError

    cli_settings(config)
    if task == "density":
        from radlens.models.cards import ModelError, model_folder
        from radlens.tasks.mammo_density.train import DensityDataError, evaluate_density_folder

        try:
            folder = model_folder("density" if model == "default" else model)
            evaluate_density_folder(data, folder, out, device=device)
        except (DensityDataError, ModelError, ValueError, RadlensError) as exc:
            raise fail(str(exc), 1) from None
        console.print((out / "report.md").read_text(), markup=False, highlight=False)
        return
    if task != "segmentation":
        raise fail(f"--task is segmentation or density, not {task!r}", 2)
    try:
        if compare:
            evaluation.compare_architectures(
                data, [a.strip() for a in compare.split(",") if a.strip()], out,
                epochs=epochs, folds=folds, device=device, seed=seed)
        else:
            evaluation.evaluate_folder(data, model, out, device=device, seed=seed,
                                       unlike=unlike_frames(unlike) if unlike else None)
    except (DatasetError, ValueError, RadlensError) as exc:
        raise fail(str(exc), 1) from None
    console.print((out / "report.md").read_text(), markup=False, highlight=False)


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
    write_card(card, segmenter.folder)
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
