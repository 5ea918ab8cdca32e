"""CLI commands of the evaluation package: `touchstone evaluate`, `touchstone phantoms`,
`touchstone phantom-predictions`.

Bad usage (a missing folder, an unknown protocol, a broken manifest) exits with code 2 and one
clear message; bad *prediction files* never fail the run: they are scored worst with a status.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

_console = Console(stderr=True)
_out = Console()


def _fail(message: str) -> None:
    _console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _progress(auto_refresh: bool = True) -> Progress:
    """A progress bar on stderr. ``auto_refresh=False`` runs no refresh thread (the caller refreshes),
    so worker processes can be forked safely."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=False,
        auto_refresh=auto_refresh,
    )


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return str(v)


def write_results_csv(path: Path, rows, protocol) -> Path:
    """Long format: ``case_id, organ, dsc, nsd[, hd95][, assd][, lesion metrics], status, detail``
    (full float precision; a lesion metric is empty on an organ's row)."""
    metrics = list(protocol.metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "organ", *metrics, "status", "detail"])
        for r in rows:
            writer.writerow([r.case_id, r.organ, *(_fmt(r.value(m)) for m in metrics), r.status, r.detail])
    tmp.replace(path)
    return path


#: columns of the per-lesion CSV (``touchstone evaluate --lesions-out``)
LESION_CSV_COLUMNS = ("case_id", "lesion_class", "side", "component", "voxels", "volume_mm3", "diameter_mm",
                      "matched", "matched_to", "iou", "dsc")


def write_lesions_csv(path: Path, rows) -> Path:
    """One row per lesion (every truth component, then every predicted one) of every lesion class
    row: its size, whether it was matched (and to which component of the other side), IoU and DSC
    with its match (0 when unmatched). Failed predictions have no lesion records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(LESION_CSV_COLUMNS)
        for r in rows:
            for lesion in r.lesions:
                writer.writerow([r.case_id, r.organ, lesion.side, lesion.index, lesion.voxels, _fmt(lesion.volume_mm3),
                                 _fmt(lesion.diameter_mm), str(lesion.matched).lower(),
                                 "" if lesion.matched_to is None else lesion.matched_to, _fmt(lesion.iou), _fmt(lesion.dsc)])
    tmp.replace(path)
    return path


def evaluate(
    gt: Optional[Path] = typer.Option(None, "--gt", help="Ground-truth folder: one sub-folder per case."),
    pred: Path = typer.Option(..., "--pred", help="Prediction folder: one sub-folder per case (either layout)."),
    protocol: str = typer.Option("touchstone", "--protocol", help="Preset (touchstone, nsd-deepmind) or a .yaml/.json protocol file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the long-format per-case, per-organ CSV here."),
    lesions_out: Optional[Path] = typer.Option(
        None, "--lesions-out", help="Lesion protocols: write one row per lesion (size, matched or not, IoU, DSC) here."
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes scoring cases in parallel."),
    cases_from: Optional[Path] = typer.Option(
        None, "--cases-from", help="Score only this manifest's cases, in its order; ground truth from its labels column unless --gt is given."
    ),
    device: str = typer.Option(
        "cpu", "--device", help="cpu (default) or a torch device (cuda, cuda:N) for the optional GPU path; needs touchstone[gpu]."
    ),
) -> None:
    """Score predictions against ground truth, case by case and organ by organ.

    A missing or invalid prediction scores the protocol's worst values with a status saying why;
    the command still exits 0. Exit code 2: bad usage (missing folder, unknown protocol, bad manifest)
    or unusable ground truth.
    """
    from evaluation.io import GroundTruthError, detect_layout
    from evaluation.protocols import load_protocol
    from evaluation.scoring import CaseToScore, score_cases, summarize

    try:
        proto = load_protocol(protocol)
    except ValueError as exc:
        _fail(str(exc))
    if lesions_out is not None and not proto.lesions:
        _fail(f"--lesions-out needs a protocol with lesion classes (kind: lesion), e.g. touchstone-lesions; {proto.key} has none")
    if device != "cpu":
        from evaluation.gpu import GpuUnavailableError, resolve_device

        try:
            resolve_device(device)
        except GpuUnavailableError as exc:
            _fail(str(exc))
    if gt is None and cases_from is None:
        _fail("give the ground truth: --gt DIR (one sub-folder per case) or --cases-from manifest.csv")
    if gt is not None and not gt.is_dir():
        _fail(f"ground-truth folder {str(gt)!r} does not exist or is not a folder; check --gt")
    if not pred.is_dir():
        _fail(f"prediction folder {str(pred)!r} does not exist or is not a folder; check --pred")

    if cases_from is not None:
        from evaluation.manifest import ManifestError, read_manifest

        try:
            manifest = read_manifest(cases_from, check_files=gt is None)
        except ManifestError as exc:
            _fail(str(exc))
        todo = [
            CaseToScore(r.case_id, (gt / r.case_id) if gt is not None else manifest.labels_path(r), pred / r.case_id)
            for r in manifest.rows
        ]
        if gt is not None:
            missing_gt = [c.case_id for c in todo if detect_layout(c.gt) is None]
            if missing_gt:
                _fail(f"{len(missing_gt)} manifest case(s) have no labels under --gt {str(gt)!r}: {missing_gt[:5]}")
    else:
        case_ids = sorted(p.name for p in gt.iterdir() if p.is_dir() and not p.name.startswith(".") and detect_layout(p))  # type: ignore[union-attr]
        if not case_ids:
            _fail(f"no case folders with labels under {str(gt)!r} (expected <case>/segmentations/ or <case>/combined_labels.nii.gz)")
        todo = [CaseToScore(c, gt / c, pred / c) for c in case_ids]  # type: ignore[operator]
    wanted = {c.case_id for c in todo}
    extra = sorted(p.name for p in pred.iterdir() if p.is_dir() and p.name not in wanted)
    if extra:
        _console.print(f"[yellow]note:[/] {len(extra)} prediction folder(s) are not test cases and are ignored: {extra[:5]}")

    started = time.perf_counter()
    try:
        with _progress(auto_refresh=False) as bar:
            task = bar.add_task(f"scoring ({proto.key}, {workers} worker(s))", total=len(todo))

            def advance(_case_id: str, _rows: list) -> None:
                bar.advance(task)
                bar.refresh()

            rows = score_cases(todo, proto, workers=workers, progress=advance, device=device)
    except GroundTruthError as exc:
        _fail(f"{exc}\nFix the test set's labels (or leave the case out with --cases-from); nothing was written.")
    elapsed = time.perf_counter() - started

    summary = summarize(rows, proto)
    table = Table(title=f"{len(todo)} case(s), protocol {proto.key}, {elapsed:.1f} s")
    table.add_column("organ")
    table.add_column("cases", justify="right")
    metric_cols = list(dict.fromkeys(k for entry in summary for k in entry if k.startswith("mean_")))
    for k in metric_cols:
        table.add_column(k.replace("mean_", "mean ").upper().replace("MEAN ", "mean "), justify="right")
    table.add_column("not ok", justify="right")
    for entry in summary:
        table.add_row(str(entry["organ"]), str(entry["cases"]), *(f"{entry[k]:.4f}" if k in entry else "" for k in metric_cols), str(entry["not_ok"]))
    _out.print(table)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    _out.print("rows by status: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    if out is not None:
        write_results_csv(out, rows, proto)
        _out.print(f"wrote {len(rows)} rows to {out}")
    if lesions_out is not None:
        write_lesions_csv(lesions_out, rows)
        _out.print(f"wrote {sum(len(r.lesions) for r in rows)} lesion rows to {lesions_out}")
    else:
        _out.print("(use --out results.csv to save the per-case rows)")


def phantoms(
    out: Path = typer.Option(..., "--out", help="Folder to write the test set into."),
    cases: int = typer.Option(..., "--cases", min=1, help="Number of cases."),
    hospitals: int = typer.Option(3, "--hospitals", min=1, help="Number of hospitals."),
    size: str = typer.Option("tiny", "--size", help="tiny (~64³), small (~128×128×80) or full (512×512×~300)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the same seed gives the same files)."),
    public_sample: int = typer.Option(0, "--public-sample", min=0, help="How many cases to mark public_sample=true."),
    combined: bool = typer.Option(False, "--combined/--no-combined", help="Also write combined_labels.nii.gz per case."),
    lesions: bool = typer.Option(
        False, "--lesions/--no-lesions",
        help="Tumour phantoms: liver, kidney and pancreatic lesions with labels of their own (score with --protocol touchstone-lesions).",
    ),
) -> None:
    """Write a synthetic abdominal CT test set: <case>/ct.nii.gz, <case>/segmentations/<organ>.nii.gz, manifest.csv."""
    from evaluation.phantoms import SIZES, write_phantom_set

    if size not in SIZES:
        _fail(f"unknown --size {size!r}; use one of {', '.join(SIZES)}")
    if out.exists() and not out.is_dir():
        _fail(f"--out {str(out)!r} exists and is not a folder")
    with _progress() as bar:
        task = bar.add_task(f"phantoms ({size})", total=cases)
        manifest = write_phantom_set(
            out, cases, n_hospitals=hospitals, size=size, seed=seed, public_sample=public_sample,  # type: ignore[arg-type]
            combined=combined, lesions=lesions, progress=lambda _case: bar.advance(task),
        )
    _out.print(f"wrote {cases} case(s) and {manifest}")


def phantom_predictions(
    gt: Path = typer.Option(..., "--gt", help="A test set written by `touchstone phantoms` (or any labelled set)."),
    out: Path = typer.Option(..., "--out", help="Folder to write predictions into."),
    kind: str = typer.Option(
        "realistic", "--kind",
        help="perfect, shift, erode, dilate, miss_organ, false_positive, wrong_affine, realistic, miss_small_lesions.",
    ),
    layout: str = typer.Option("masks", "--layout", help="masks (segmentations/<organ>.nii.gz) or combined (combined_labels.nii.gz)."),
    seed: int = typer.Option(0, "--seed"),
    magnitude: int = typer.Option(1, "--magnitude", min=1, help="Voxels of shift/erosion/dilation, number of blobs, 5 mm units of affine error."),
    missing_cases: int = typer.Option(0, "--missing-cases", min=0, help="Leave this many cases without a prediction."),
    lesions: bool = typer.Option(False, "--lesions/--no-lesions", help="The test set has lesion classes (touchstone phantoms --lesions)."),
) -> None:
    """Write imperfect predictions of a labelled test set in a controlled way (for tests and benchmarks)."""
    from evaluation.phantoms import PREDICTION_KINDS, write_predictions

    if kind not in PREDICTION_KINDS:
        _fail(f"unknown --kind {kind!r}; use one of {', '.join(PREDICTION_KINDS)}")
    if layout not in ("masks", "combined"):
        _fail(f"unknown --layout {layout!r}; use masks or combined")
    if not gt.is_dir():
        _fail(f"--gt {str(gt)!r} is not a folder")
    n = sum(1 for p in gt.iterdir() if p.is_dir())
    with _progress() as bar:
        task = bar.add_task(f"predictions ({kind})", total=n)
        result = write_predictions(
            gt, out, kind, layout=layout, seed=seed, missing_cases=missing_cases, magnitude=magnitude, lesions=lesions,  # type: ignore[arg-type]
            progress=lambda _c: bar.advance(task),
        )
    _out.print(f"wrote {len(result['written'])} prediction(s) to {out}; left out: {result['missing'] or 'none'}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `touchstone` app."""
    app.command("evaluate")(evaluate)
    app.command("phantoms")(phantoms)
    app.command("phantom-predictions")(phantom_predictions)
